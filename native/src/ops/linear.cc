// Argument checks for the frozen linear layer. Optional `segments`: the LoRA of the same
// projection (as lora_forward / lora_backward take them; backward then also needs `x`), run
// in the same call so the CPU can fuse it into the base GEMM.
#include "lora_segments.h"
#include "op.h"

namespace mlora {

// linear_forward: y[m,n] = x[m,k]·w[n,k]ᵀ (+= with accumulate); bf16: operands rounded to bf16
MLORA_OP(linear_forward) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  TensorImpl w = a.tensor("w", MLORA_WEIGHT_DTYPES);
  if (w.shape.size() != 2) a.fail("argument 'w' must be 2-D [out, in], got " + w.shape_str());
  int64_t n = w.shape[0], k = w.shape[1];
  if (x.numel() % k != 0 || x.shape.back() != k)
    a.fail("argument 'x' " + x.shape_str() + " does not end in in=" + std::to_string(k));
  int64_t m = x.numel() / k;
  if (y.numel() != m * n || y.shape.back() != n)
    a.fail("argument 'y' has shape " + y.shape_str() + ", expected [" + std::to_string(m) + "," + std::to_string(n) +
           "]");
  a.expect_distinct("y", y, "x", x);
  bool acc = a.flag("accumulate", false);
  const WeightRef wr = linear_weight(w, true, a.flag("bf16", false));
  if (a.has("segments")) {
    std::vector<LoraSegment> segs = parse_segments(a, m, k, n, false, {{"x", &x}, {"y", &y}, {"w", &w}});
    return [=](Exec& ex) {
      MLORA_DISPATCH(ex, linear_lora_forward, y.as<float>(), x.as<float>(), wr, m, n, k, acc, segs.data(),
                     int64_t(segs.size()));
    };
  }
  return [=](Exec& ex) { MLORA_DISPATCH(ex, linear_forward, y.as<float>(), x.as<float>(), wr, m, n, k, acc); };
}

// linear_backward: dx[m,k] = dy[m,n]·w[n,k] (+= with accumulate)
MLORA_OP(linear_backward) {
  TensorImpl dx = a.tensor("dx", {DType::F32});
  TensorImpl dy = a.tensor("dy", {DType::F32});
  TensorImpl w = a.tensor("w", MLORA_WEIGHT_DTYPES);
  if (w.shape.size() != 2) a.fail("argument 'w' must be 2-D [out, in], got " + w.shape_str());
  int64_t n = w.shape[0], k = w.shape[1];
  if (dy.numel() % n != 0 || dy.shape.back() != n)
    a.fail("argument 'dy' " + dy.shape_str() + " does not end in out=" + std::to_string(n));
  int64_t m = dy.numel() / n;
  if (dx.numel() != m * k || dx.shape.back() != k)
    a.fail("argument 'dx' has shape " + dx.shape_str() + ", expected [" + std::to_string(m) + "," + std::to_string(k) +
           "]");
  a.expect_distinct("dx", dx, "dy", dy);
  bool acc = a.flag("accumulate", false);
  const WeightRef wr = linear_weight(w, false, a.flag("bf16", false));
  if (a.has("segments")) {
    TensorImpl x = a.tensor("x", {DType::F32});
    if (x.numel() != m * k || x.shape.back() != k)
      a.fail("argument 'x' has shape " + x.shape_str() + ", expected [" + std::to_string(m) + "," + std::to_string(k) +
             "] (like dx)");
    a.expect_distinct("dx", dx, "x", x);
    std::vector<LoraSegment> segs = parse_segments(a, m, k, n, true, {{"x", &x}, {"dx", &dx}, {"dy", &dy}, {"w", &w}});
    return [=](Exec& ex) {
      MLORA_DISPATCH(ex, linear_lora_backward, dx.as<float>(), dy.as<float>(), x.as<float>(), wr, m, n, k, acc,
                     segs.data(), int64_t(segs.size()));
    };
  }
  return [=](Exec& ex) { MLORA_DISPATCH(ex, linear_backward, dx.as<float>(), dy.as<float>(), wr, m, n, k, acc); };
}

}  // namespace mlora
