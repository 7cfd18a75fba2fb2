// What this x86 CPU can do, read once with cpuid (the GEMM and other hot loops pick their
// vector width at run time, so one build runs on any x86-64 machine).
#pragma once
#include <cstdint>

namespace mlora {

class ThreadPool;

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false, avx512bf16 = false,
       amx_bf16 = false;  // amx_bf16: the CPU has AMX-BF16 and the OS keeps tile state
};

const CpuFeatures& cpu_features();
// Asks Linux for permission to use AMX tile data in this process (once); false where refused.
bool amx_permitted();
const char* cpu_gemm_kernel_name();       // which GEMM micro-kernel this machine runs (gemm.cc)
int64_t cpu_gemm_packed_b_words();        // B words the GEMM packed per call since start (gemm.cc)
const char* cpu_gemm_bf16_kernel_name();  // and which one bf16 compute runs
// FP32 FMA throughput of the GEMM kernel's instruction set: every pool thread runs `iters`
// rounds of independent FMA chains; returns GFLOP/s summed over threads (the benchmark's
// ceiling, gemm.cc).
double cpu_fma_peak_gflops(ThreadPool& pool, int64_t iters, bool bf16 = false);  // bf16: the bf16 kernel's instruction

}  // namespace mlora
