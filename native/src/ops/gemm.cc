// Argument checks for the general GEMM (used by tests, benchmarks and the model's LM head).
#include "../cpu/cpu_features.h"
#include "op.h"

namespace mlora {

// gemm: c[m,n] = alpha·op(a)·op(b) + beta·c. a is [m,k] (or [k,m] with transA), b is [k,n]
// (or [n,k] with transB) in f32/f16/bf16.
MLORA_OP(gemm) {
  TensorImpl c = a.tensor("c", {DType::F32});
  TensorImpl A = a.tensor("a", {DType::F32});
  TensorImpl B = a.tensor("b", MLORA_WEIGHT_DTYPES);
  bool ta = a.flag("transA", false), tb = a.flag("transB", false);
  if (A.shape.size() != 2 || B.shape.size() != 2 || c.shape.size() != 2) a.fail("a, b and c must be 2-D");
  int64_t m = ta ? A.shape[1] : A.shape[0], k = ta ? A.shape[0] : A.shape[1];
  int64_t n = tb ? B.shape[0] : B.shape[1];
  int64_t kb = tb ? B.shape[1] : B.shape[0];
  if (kb != k)
    a.fail("inner dimensions differ: op(a) is [" + std::to_string(m) + "," + std::to_string(k) + "], op(b) is [" +
           std::to_string(kb) + "," + std::to_string(n) + "]");
  a.expect_shape("c", c, {m, n});
  a.expect_distinct("c", c, "a", A);
  float alpha = float(a.number("alpha", 1.0)), beta = float(a.number("beta", 0.0));
  WeightRef wb = weight(B);
  wb.bf16_compute = a.flag("bf16", false);  // operands rounded to bf16, f32 accumulation
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, gemm, ta, tb, m, n, k, alpha, A.as<float>(), A.shape[1], wb, B.shape[1], beta, c.as<float>(), n);
  };
}

}  // namespace mlora

namespace mlora {

// fma_peak: out[0] = the device's FP32 FMA throughput in GFLOP/s (all its threads, the GEMM
// kernel's vector width), measured over `iterations` rounds per thread. A benchmark ceiling.
MLORA_OP(fma_peak) {
  TensorImpl out = a.tensor("out", {DType::F32});
  if (out.numel() < 1) a.fail("argument 'out' must hold at least one element");
  int64_t iters = a.integer("iterations", 20000000);
  if (iters < 1) a.fail("argument 'iterations' must be positive");
  bool bf16 = a.flag("bf16", false);  // the bf16-compute kernel's instruction (vdpbf16ps where it runs)
  return [=](Exec& ex) {
    if (ex.cuda()) throw Error("fma_peak measures a CPU device");
    out.as<float>()[0] = float(cpu_fma_peak_gflops(ex.pool(), iters, bf16));
  };
}

}  // namespace mlora
