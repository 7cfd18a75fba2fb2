// Argument checks for SwiGLU. All tensors f32 with the same element count; an output may be
// exactly one of its elementwise inputs (in place) but must not partially overlap any.
#include "op.h"

namespace mlora {

namespace {
void same_or_distinct(Args& a, const char* na, const TensorImpl& ta, const char* nb, const TensorImpl& tb) {
  if (ta.data() == tb.data() && ta.nbytes() == tb.nbytes()) return;
  a.expect_distinct(na, ta, nb, tb);
}
}  // namespace

// swiglu_forward: h = silu(gate)·up
MLORA_OP(swiglu_forward) {
  TensorImpl h = a.tensor("h", {DType::F32});
  TensorImpl gate = a.tensor("gate", {DType::F32});
  TensorImpl up = a.tensor("up", {DType::F32});
  int64_t n = gate.numel();
  a.expect_numel("up", up, n);
  a.expect_numel("h", h, n);
  same_or_distinct(a, "h", h, "gate", gate);
  same_or_distinct(a, "h", h, "up", up);
  return [=](Exec& ex) { MLORA_DISPATCH(ex, swiglu_forward, h.as<float>(), gate.as<float>(), up.as<float>(), n); };
}

// swiglu_backward: dgate, dup written (=)
MLORA_OP(swiglu_backward) {
  TensorImpl dgate = a.tensor("dgate", {DType::F32});
  TensorImpl dup = a.tensor("dup", {DType::F32});
  TensorImpl dh = a.tensor("dh", {DType::F32});
  TensorImpl gate = a.tensor("gate", {DType::F32});
  TensorImpl up = a.tensor("up", {DType::F32});
  int64_t n = gate.numel();
  a.expect_numel("up", up, n);
  a.expect_numel("dh", dh, n);
  a.expect_numel("dgate", dgate, n);
  a.expect_numel("dup", dup, n);
  a.expect_distinct("dgate", dgate, "dup", dup);
  for (auto [name, t] : {std::pair<const char*, const TensorImpl*>{"dh", &dh}, {"gate", &gate}, {"up", &up}}) {
    same_or_distinct(a, "dgate", dgate, name, *t);
    same_or_distinct(a, "dup", dup, name, *t);
  }
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, swiglu_backward, dgate.as<float>(), dup.as<float>(), dh.as<float>(), gate.as<float>(),
                   up.as<float>(), n);
  };
}

}  // namespace mlora
