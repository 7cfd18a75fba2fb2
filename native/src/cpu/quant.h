// Quantized base weights (bitsandbytes NF4, NF4 with double quantization, LLM.int8 row-wise):
// the dequantizer the GEMM's B packing calls, and the quantizer used at load time. Layout of
// the blob: QuantLayout (core/dtype.h).
#pragma once
#include <cstdint>

#include "../core/dtype.h"

namespace mlora {

class ThreadPool;

namespace cpu {

enum class Isa { Scalar, Avx2, Avx512 };

// out[0..len) = the dequantized flat elements [i0, i0 + len) of w (any alignment), exactly as
// bitsandbytes dequantizes them (float32: code[q]·absmax', absmax' = dyn[u8]·nested + offset;
// int8: (CB·SCB)·(1/127)). Every ISA gives the same bits.
void dequant_run(Isa isa, const WeightRef& w, int64_t i0, int64_t len, float* out);
// The ISA of the GEMM kernel this process runs (MLORA_GEMM_KERNEL forces it; gemm.cc).
Isa gemm_isa();

// dst = quantize(src): src is f32/bf16/f16 [rows, cols], dst a blob of dst_dtype. Follows the
// bitsandbytes rounding rules (README of test/fixtures/quant): NF4 by thresholds at the float32
// midpoints of the code book, absmax·(1/absmax) scaling; double quantization with the mean
// offset and the 8-bit dynamic code in blocks of 256; int8 from the float16-rounded weight.
void quantize(ThreadPool& pool, DType dst_dtype, void* dst, WeightRef src, int64_t rows, int64_t cols);

// The 256-entry signed dynamic code (create_dynamic_map(signed=True, 7, 8)).
const float* dynamic_code();

}  // namespace cpu
}  // namespace mlora
