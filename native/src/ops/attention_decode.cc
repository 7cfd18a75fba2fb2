// Argument checks for attention over a KV cache (generation). CPU only.
#include <cmath>

#include "op.h"

namespace mlora {
namespace cpu {
void attention_decode(Exec& ex, float* out, const float* q, const float* k_cache, const float* v_cache, int64_t nq,
                      int64_t length, int64_t hq, int64_t hkv, int64_t d, float scale, int64_t window);
}

// attention_decode: out [nq, hq·d] = causal attention of q [nq, hq·d] (the last nq positions)
// over kCache/vCache [capacity, hkv·d] rows 0..length-1; with 'window' W > 0 the query at
// position p sees only rows p-W+1 .. p (as attention_forward).
MLORA_OP(attention_decode) {
  TensorImpl out = a.tensor("out", {DType::F32});
  TensorImpl q = a.tensor("q", {DType::F32});
  TensorImpl kc = a.tensor("kCache", {DType::F32});
  TensorImpl vc = a.tensor("vCache", {DType::F32});
  int64_t hq = a.integer("heads"), hkv = a.integer("kvHeads"), length = a.integer("length");
  if (hq < 1 || hkv < 1 || hq % hkv != 0) a.fail("heads must be a positive multiple of kvHeads");
  if (q.shape.size() != 2 || q.shape[1] % hq != 0)
    a.fail("argument 'q' must be [nq, heads·headDim], got " + q.shape_str());
  int64_t nq = q.shape[0], d = q.shape[1] / hq;
  a.expect_shape("out", out, {nq, hq * d});
  a.expect_shape("kCache", kc, {-1, hkv * d});
  a.expect_shape("vCache", vc, {kc.shape[0], hkv * d});
  if (length < nq || length > kc.shape[0])
    a.fail("length " + std::to_string(length) + " must be in [" + std::to_string(nq) + ", " +
           std::to_string(kc.shape[0]) + "] (the cache capacity)");
  a.expect_distinct("out", out, "q", q);
  float scale = float(a.number("scale", 1.0 / std::sqrt(double(d))));
  int64_t window = attention_window(a);
  return [=](Exec& ex) {
    if (ex.cuda()) throw Error("attention_decode runs on CPU devices only");
    cpu::attention_decode(ex, out.as<float>(), q.as<float>(), kc.as<float>(), vc.as<float>(), nq, length, hq, hkv, d,
                          scale, window);
  };
}

}  // namespace mlora
