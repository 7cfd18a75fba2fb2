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
