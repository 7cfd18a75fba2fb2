// Argument checks for causal varlen GQA attention (cpu/attention.cc). The contents of
// cuSeqlens are data: the kernel checks them (start 0, non-decreasing, end at n) and rejects
// the run with an Error naming 'cuSeqlens'.
#include <cmath>

#include "op.h"

namespace mlora {

namespace {

struct AttnDims {
  int64_t nseq, n, hq, hkv, d;
  float scale;
  int64_t window;
};

// x is [n, heads·d] or [n, heads, d]; returns d.
int64_t head_dim_of(Args& a, const char* name, const TensorImpl& x, int64_t heads) {
  if (x.shape.size() == 3) {
    if (x.shape[1] != heads)
      a.fail(std::string("argument '") + name + "' has shape " + x.shape_str() + ", expected [n, " +
             std::to_string(heads) + ", head_dim]");
    return x.shape[2];
  }
  if (x.shape.size() == 2) {
    if (x.shape[1] % heads != 0)
      a.fail(std::string("argument '") + name + "' has shape " + x.shape_str() + ": its width is not a multiple of " +
             std::to_string(heads) + " heads");
    return x.shape[1] / heads;
  }
  a.fail(std::string("argument '") + name + "' must be [n, heads·head_dim] or [n, heads, head_dim], got " +
         x.shape_str());
}

// Same element count and row count as the reference tensor.
void expect_like(Args& a, const char* name, const TensorImpl& t, int64_t n, int64_t numel, const char* like) {
  if (t.shape.empty() || t.shape[0] != n || t.numel() != numel)
    a.fail(std::string("argument '") + name + "' has shape " + t.shape_str() + ", expected " + std::to_string(n) +
           " rows and " + std::to_string(numel) + " elements like '" + like + "'");
}

AttnDims attn_dims(Args& a, const TensorImpl& q, const TensorImpl& k, const TensorImpl& v, const TensorImpl& cu,
                   const TensorImpl& lse) {
  int64_t hq = a.integer("heads"), hkv = a.integer("kvHeads");
  if (hq <= 0) a.fail("argument 'heads' must be positive, got " + std::to_string(hq));
  if (hkv <= 0) a.fail("argument 'kvHeads' must be positive, got " + std::to_string(hkv));
  if (hq % hkv != 0)
    a.fail("argument 'kvHeads' (" + std::to_string(hkv) + ") must divide 'heads' (" + std::to_string(hq) + ")");
  int64_t d = head_dim_of(a, "q", q, hq);
  if (d <= 0) a.fail("argument 'q' has head_dim " + std::to_string(d) + " (shape " + q.shape_str() + "), expected > 0");
  int64_t n = q.shape[0];
  if (head_dim_of(a, "k", k, hkv) != d || k.shape[0] != n)
    a.fail("argument 'k' has shape " + k.shape_str() + ", expected [" + std::to_string(n) + ", " + std::to_string(hkv) +
           "·" + std::to_string(d) + "] (kvHeads·head_dim)");
  if (head_dim_of(a, "v", v, hkv) != d || v.shape[0] != n)
    a.fail("argument 'v' has shape " + v.shape_str() + ", expected [" + std::to_string(n) + ", " + std::to_string(hkv) +
           "·" + std::to_string(d) + "] (kvHeads·head_dim)");
  if (cu.shape.size() != 1 || cu.shape[0] < 1)
    a.fail("argument 'cuSeqlens' must be 1-D [nseq+1] with at least one element, got " + cu.shape_str());
  a.expect_shape("lse", lse, {hq, n});
  double sc = a.number("scale", 1.0 / std::sqrt(double(d)));
  if (!(sc > 0)) a.fail("argument 'scale' must be positive, got " + std::to_string(sc));
  return {cu.shape[0] - 1, n, hq, hkv, d, float(sc), attention_window(a)};
}

}  // namespace

// attention_forward: out = softmax(scale·q·kᵀ, causal (and windowed), per sequence)·v; lse saved.
MLORA_OP(attention_forward) {
  TensorImpl out = a.tensor("out", {DType::F32});
  TensorImpl lse = a.tensor("lse", {DType::F32});
  TensorImpl q = a.tensor("q", {DType::F32});
  TensorImpl k = a.tensor("k", {DType::F32});
  TensorImpl v = a.tensor("v", {DType::F32});
  TensorImpl cu = a.tensor("cuSeqlens", {DType::I32});
  AttnDims d = attn_dims(a, q, k, v, cu, lse);
  expect_like(a, "out", out, d.n, q.numel(), "q");
  a.expect_outputs_distinct({{"out", &out}, {"lse", &lse}}, {{"q", &q}, {"k", &k}, {"v", &v}});
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, attention_forward, out.as<float>(), lse.as<float>(), q.as<float>(), k.as<float>(), v.as<float>(),
                   cu.as<int32_t>(), d.nseq, d.n, d.hq, d.hkv, d.d, d.scale, d.window);
  };
}

// attention_backward: dq, dk, dv (written, =) from dout and the forward's q, k, v, out, lse.
MLORA_OP(attention_backward) {
  TensorImpl dq = a.tensor("dq", {DType::F32});
  TensorImpl dk = a.tensor("dk", {DType::F32});
  TensorImpl dv = a.tensor("dv", {DType::F32});
  TensorImpl dout = a.tensor("dout", {DType::F32});
  TensorImpl q = a.tensor("q", {DType::F32});
  TensorImpl k = a.tensor("k", {DType::F32});
  TensorImpl v = a.tensor("v", {DType::F32});
  TensorImpl out = a.tensor("out", {DType::F32});
  TensorImpl lse = a.tensor("lse", {DType::F32});
  TensorImpl cu = a.tensor("cuSeqlens", {DType::I32});
  AttnDims d = attn_dims(a, q, k, v, cu, lse);
  expect_like(a, "out", out, d.n, q.numel(), "q");
  expect_like(a, "dout", dout, d.n, q.numel(), "q");
  expect_like(a, "dq", dq, d.n, q.numel(), "q");
  expect_like(a, "dk", dk, d.n, k.numel(), "k");
  expect_like(a, "dv", dv, d.n, v.numel(), "v");
  a.expect_outputs_distinct(
      {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}},
      {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}, {"cuSeqlens", &cu}});
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, attention_backward, dq.as<float>(), dk.as<float>(), dv.as<float>(), dout.as<float>(),
                   q.as<float>(), k.as<float>(), v.as<float>(), out.as<float>(), lse.as<float>(), cu.as<int32_t>(),
                   d.nseq, d.n, d.hq, d.hkv, d.d, d.scale, d.window);
  };
}

}  // namespace mlora
