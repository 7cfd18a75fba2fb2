// Argument checks for quantizing a base weight at load and dequantizing one (tests, tools).
#include "../cpu/quant.h"
#include "op.h"

namespace mlora {

// quantize: dst (nf4 | nf4dq | int8 [rows, cols]) = quantize(src f32/bf16/f16 [rows, cols]).
MLORA_OP(quantize) {
  TensorImpl dst = a.tensor("dst", {DType::NF4, DType::NF4DQ, DType::INT8});
  TensorImpl src = a.tensor("src", {DType::F32, DType::F16, DType::BF16});
  a.expect_shape("src", src, dst.shape);
  return [=](Exec& ex) {
    if (ex.cuda()) throw Error("quantize: quantized base weights are kept on CPU devices only");
    cpu::quantize(ex.pool(), dst.dtype, dst.data(), weight(src), dst.shape[0], dst.shape[1]);
  };
}

// dequantize: dst (f32 [rows, cols]) = the weight as bitsandbytes dequantizes it.
MLORA_OP(dequantize) {
  TensorImpl dst = a.tensor("dst", {DType::F32});
  TensorImpl src = a.tensor("src", {DType::NF4, DType::NF4DQ, DType::INT8});
  a.expect_shape("dst", dst, src.shape);
  return [=](Exec& ex) {
    if (ex.cuda()) throw Error("dequantize: quantized base weights are kept on CPU devices only");
    const WeightRef w = weight(src);
    const cpu::Isa isa = cpu::gemm_isa();
    const int64_t rows = src.shape[0], cols = src.shape[1];
    ex.pool().parallel_for(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, cols)),
                           [&](int64_t r0, int64_t r1, int) {
                             cpu::dequant_run(isa, w, r0 * cols, (r1 - r0) * cols, dst.as<float>() + r0 * cols);
                           });
  };
}

}  // namespace mlora
