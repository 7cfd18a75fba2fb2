// Argument checks for RMSNorm. x, y, dx, dy are [n, h] (any leading shape ending in h), w [h]
// in f32/bf16/f16, rstd [n] f32, dw [h] f32 (optional).
#include "op.h"

namespace mlora {

namespace {
int64_t rows_of(Args& a, const char* name, const TensorImpl& t, int64_t h) {
  if (t.shape.empty() || t.shape.back() != h)
    a.fail(std::string("argument '") + name + "' has shape " + t.shape_str() + ", expected [*," + std::to_string(h) +
           "] (h from w)");
  return t.numel() / h;
}
}  // namespace

// rmsnorm_forward: y = x·rstd·w, rstd[n] saved. y may be x itself (in place).
MLORA_OP(rmsnorm_forward) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl rstd = a.tensor("rstd", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  TensorImpl w = a.tensor("w", {DType::F32, DType::BF16, DType::F16});
  if (w.shape.size() != 1 || w.shape[0] < 1) a.fail("argument 'w' must be 1-D [h] with h >= 1, got " + w.shape_str());
  int64_t h = w.shape[0];
  int64_t n = rows_of(a, "x", x, h);
  a.expect_numel("y", y, n * h);
  rows_of(a, "y", y, h);
  a.expect_numel("rstd", rstd, n);
  if (y.data() != x.data()) a.expect_distinct("y", y, "x", x);
  a.expect_distinct("rstd", rstd, "x", x);
  a.expect_distinct("rstd", rstd, "y", y);
  double eps = a.number("eps");
  if (eps < 0) a.fail("argument 'eps' must be >= 0, got " + std::to_string(eps));
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, rmsnorm_forward, y.as<float>(), rstd.as<float>(), x.as<float>(), weight(w), n, h, float(eps));
  };
}

// rmsnorm_backward: dx (= or += with accumulate), dw += (optional)
MLORA_OP(rmsnorm_backward) {
  TensorImpl dx = a.tensor("dx", {DType::F32});
  TensorImpl dy = a.tensor("dy", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  TensorImpl w = a.tensor("w", {DType::F32, DType::BF16, DType::F16});
  TensorImpl rstd = a.tensor("rstd", {DType::F32});
  if (w.shape.size() != 1 || w.shape[0] < 1) a.fail("argument 'w' must be 1-D [h] with h >= 1, got " + w.shape_str());
  int64_t h = w.shape[0];
  int64_t n = rows_of(a, "x", x, h);
  a.expect_numel("dy", dy, n * h);
  rows_of(a, "dy", dy, h);
  a.expect_numel("dx", dx, n * h);
  rows_of(a, "dx", dx, h);
  a.expect_numel("rstd", rstd, n);
  a.expect_distinct("dx", dx, "dy", dy);
  a.expect_distinct("dx", dx, "x", x);
  a.expect_distinct("dx", dx, "rstd", rstd);
  float* dwp = nullptr;
  if (a.has("dw")) {
    TensorImpl dw = a.tensor("dw", {DType::F32});
    a.expect_numel("dw", dw, h);
    a.expect_distinct("dw", dw, "dx", dx);
    a.expect_distinct("dw", dw, "dy", dy);
    a.expect_distinct("dw", dw, "x", x);
    a.expect_distinct("dw", dw, "w", w);
    dwp = dw.as<float>();
  }
  bool acc = a.flag("accumulate", false);
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, rmsnorm_backward, dx.as<float>(), dwp, dy.as<float>(), x.as<float>(), weight(w),
                   rstd.as<float>(), n, h, acc);
  };
}

}  // namespace mlora
