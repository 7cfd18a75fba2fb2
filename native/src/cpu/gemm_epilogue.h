// A per-tile epilogue for the CPU GEMM (gemm.cc): fused kernels use it to add their own
// product into C while a finished tile of C is still in L1 (lora.cc: the LoRA expand of the
// base projection's rows), instead of streaming all of C through memory once more.
#pragma once
#include <cstdint>

#include "../kernels.h"

namespace mlora::cpu {

struct GemmEpilogue {
  // Called once for every tile of C, rows [i0, i0+m) × columns [j0, j0+n) with c its first
  // element, after the GEMM's last contribution to it; tiles never overlap, and two threads
  // may run fn on different tiles at the same time. A tile is at most kMaxMR × kMaxNR
  // (gemm.cc: 32 × 32).
  void (*fn)(const void* ctx, int64_t i0, int64_t m, int64_t j0, int64_t n, float* c, int64_t ldc);
  const void* ctx;
};

// gemm (kernels.inc) with an epilogue on every finished tile of C.
void gemm(Exec& ex, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, WeightRef b, int64_t ldb, float beta, float* c, int64_t ldc, const GemmEpilogue& ep);

}  // namespace mlora::cpu
