// Argument checks for the rotary embedding (cpu/rope.cc). Positions are data: the kernel
// checks them against the table (an out-of-range one rejects the run with an Error).
#include "op.h"

namespace mlora {

namespace {

struct RopeDims {
  int64_t n, heads, head_dim, max_pos;
};

// x is [n, heads·d] or [n, heads, d]; cos/sin are [max_pos, d/2]; pos is i32 [n].
RopeDims rope_dims(Args& a, const char* yname, const TensorImpl& y, const char* xname, const TensorImpl& x,
                   const TensorImpl& pos, const TensorImpl& cs, const TensorImpl& sn) {
  int64_t heads = a.integer("heads");
  if (heads <= 0) a.fail("argument 'heads' must be positive, got " + std::to_string(heads));
  if (cs.shape.size() != 2) a.fail("argument 'cos' must be 2-D [max_pos, head_dim/2], got " + cs.shape_str());
  if (cs.shape[1] <= 0) a.fail("argument 'cos' has an empty second dimension " + cs.shape_str());
  a.expect_shape("sin", sn, {cs.shape[0], cs.shape[1]});
  int64_t max_pos = cs.shape[0], head_dim = 2 * cs.shape[1];
  if (pos.shape.size() != 1) a.fail("argument 'pos' must be 1-D [n], got " + pos.shape_str());
  int64_t n = pos.shape[0];
  if (x.shape.size() == 3) {
    a.expect_shape(xname, x, {n, heads, head_dim});
  } else if (x.shape.size() == 2) {
    a.expect_shape(xname, x, {n, heads * head_dim});
  } else {
    a.fail(std::string("argument '") + xname + "' must be [n, heads·head_dim] or [n, heads, head_dim], got " +
           x.shape_str());
  }
  a.expect_numel(yname, y, x.numel());
  if (y.shape.empty() || y.shape[0] != n)
    a.fail(std::string("argument '") + yname + "' has shape " + y.shape_str() + ", expected " + std::to_string(n) +
           " rows like '" + xname + "'");
  // In place is fine; a partial overlap is not.
  if (y.data() != x.data()) a.expect_distinct(yname, y, xname, x);
  return {n, heads, head_dim, max_pos};
}

}  // namespace

// rope_forward: y = rotate(x) by the angles of each row's position; y may be x.
MLORA_OP(rope_forward) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  TensorImpl pos = a.tensor("pos", {DType::I32});
  TensorImpl cs = a.tensor("cos", {DType::F32});
  TensorImpl sn = a.tensor("sin", {DType::F32});
  RopeDims d = rope_dims(a, "y", y, "x", x, pos, cs, sn);
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, rope_forward, y.as<float>(), x.as<float>(), pos.as<int32_t>(), cs.as<float>(), sn.as<float>(),
                   d.n, d.heads, d.head_dim, d.max_pos);
  };
}

// rope_backward: dx = inverse rotation of dy; dx may be dy.
MLORA_OP(rope_backward) {
  TensorImpl dx = a.tensor("dx", {DType::F32});
  TensorImpl dy = a.tensor("dy", {DType::F32});
  TensorImpl pos = a.tensor("pos", {DType::I32});
  TensorImpl cs = a.tensor("cos", {DType::F32});
  TensorImpl sn = a.tensor("sin", {DType::F32});
  RopeDims d = rope_dims(a, "dx", dx, "dy", dy, pos, cs, sn);
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, rope_backward, dx.as<float>(), dy.as<float>(), pos.as<int32_t>(), cs.as<float>(), sn.as<float>(),
                   d.n, d.heads, d.head_dim, d.max_pos);
  };
}

}  // namespace mlora
