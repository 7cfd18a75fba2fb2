// Argument checks for util.cc's kernels.
#include "op.h"

namespace mlora {

MLORA_OP(fill) {
  TensorImpl y = a.tensor("y", {DType::F32});
  float v = float(a.number("value", 0.0));
  return [=](Exec& ex) { MLORA_DISPATCH(ex, fill, y.as<float>(), y.numel(), v); };
}

// copy: y = x, converting dtype (f32/f16/bf16/i32); same element count required.
MLORA_OP(copy) {
  TensorImpl y = a.tensor("y", {DType::F32, DType::F16, DType::BF16, DType::I32});
  TensorImpl x = a.tensor("x", {DType::F32, DType::F16, DType::BF16, DType::I32});
  a.expect_numel("y", y, x.numel());
  return [=](Exec& ex) { MLORA_DISPATCH(ex, copy_cast, y.data(), y.dtype, x.data(), x.dtype, x.numel()); };
}

MLORA_OP(axpy) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  a.expect_numel("x", x, y.numel());
  float alpha = float(a.number("alpha", 1.0));
  return [=](Exec& ex) { MLORA_DISPATCH(ex, axpy, y.as<float>(), x.as<float>(), y.numel(), alpha); };
}

// add_bias: y[n, m] += b[m] on every row (a frozen base layer's bias; y's last dimension is m).
MLORA_OP(add_bias) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl b = a.tensor("b", {DType::F32, DType::BF16, DType::F16});
  if (b.shape.size() != 1 || b.shape[0] < 1) a.fail("argument 'b' must be 1-D [m] with m >= 1, got " + b.shape_str());
  int64_t m = b.shape[0];
  if (y.shape.empty() || y.shape.back() != m)
    a.fail("argument 'y' has shape " + y.shape_str() + ", expected [*, " + std::to_string(m) + "] (m from b)");
  a.expect_distinct("y", y, "b", b);
  int64_t n = y.numel() / m;
  return [=](Exec& ex) { MLORA_DISPATCH(ex, add_bias, y.as<float>(), weight(b), n, m); };
}

MLORA_OP(scale) {
  TensorImpl y = a.tensor("y", {DType::F32});
  float alpha = float(a.number("alpha"));
  return [=](Exec& ex) { MLORA_DISPATCH(ex, scale, y.as<float>(), y.numel(), alpha); };
}

// sumsq: out[0] += Σ over every tensor in xs of x² (gradient norms for clipping).
MLORA_OP(sumsq) {
  TensorImpl out = a.tensor("out", {DType::F32});
  if (out.numel() < 1) a.fail("argument 'out' must have at least one element");
  std::vector<TensorImpl> xs = a.tensor_list("xs", {DType::F32});
  return [=](Exec& ex) {
    std::vector<const float*> ptrs;
    std::vector<int64_t> ns;
    for (auto& t : xs) {
      ptrs.push_back(t.as<float>());
      ns.push_back(t.numel());
    }
    MLORA_DISPATCH(ex, sumsq, out.as<float>(), ptrs.data(), ns.data(), int64_t(xs.size()));
  };
}

// nonfinite: out[0] = how many elements of x are NaN or ±Inf.
MLORA_OP(nonfinite) {
  TensorImpl out = a.tensor("out", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  if (out.numel() < 1) a.fail("argument 'out' must have at least one element");
  return [=](Exec& ex) { MLORA_DISPATCH(ex, nonfinite, out.as<float>(), x.as<float>(), x.numel()); };
}

}  // namespace mlora
