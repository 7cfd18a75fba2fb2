// Argument checks for SwiGLU. All tensors f32 with the same element count; an output may be
// exactly one of its elementwise inputs (in place) but must not partially overlap any.
#include "op.h"

namespace mlora {

namespace {
// Every tensor has n elements; an output is one of the inputs exactly (in place) or overlaps
// none of them, and the outputs overlap each other nowhere.
void check_elementwise(Args& a, int64_t n, std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  for (const Named& t : inputs) a.expect_numel(t.first, *t.second, n);
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    a.expect_numel(o->first, *o->second, n);
    for (auto p = outputs.begin(); p != o; ++p) a.expect_distinct(p->first, *p->second, o->first, *o->second);
    for (const Named& i : inputs) {
      const TensorImpl &out = *o->second, &in = *i.second;
      if (out.data() != in.data() || out.nbytes() != in.nbytes()) a.expect_distinct(o->first, out, i.first, in);
    }
  }
}
}  // namespace

// swiglu_forward: h = silu(gate)·up
MLORA_OP(swiglu_forward) {
  TensorImpl h = a.tensor("h", {DType::F32});
  TensorImpl gate = a.tensor("gate", {DType::F32});
  TensorImpl up = a.tensor("up", {DType::F32});
  int64_t n = gate.numel();
  check_elementwise(a, n, {{"h", &h}}, {{"gate", &gate}, {"up", &up}});
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
  check_elementwise(a, n, {{"dgate", &dgate}, {"dup", &dup}}, {{"dh", &dh}, {"gate", &gate}, {"up", &up}});
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, swiglu_backward, dgate.as<float>(), dup.as<float>(), dh.as<float>(), gate.as<float>(),
                   up.as<float>(), n);
  };
}

}  // namespace mlora
