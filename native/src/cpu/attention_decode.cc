// Attention of a few new query rows over a key/value cache (generation with a KV cache).
// Forward only: generation computes no gradients. Output is written (=).
//
// q [nq, hq·d] are the rows at positions length−nq … length−1 of ONE sequence whose keys and
// values for positions 0 … length−1 are in k_cache / v_cache [capacity, hkv·d]. Query i
// attends causally to cache rows 0 … length−nq+i (with a sliding window W > 0, only the last W of
// them, as attention.cc). Grouped-query heads as in attention.cc.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"

namespace mlora::cpu {

void attention_decode(Exec& ex, float* out, const float* q, const float* k_cache, const float* v_cache, int64_t nq,
                      int64_t length, int64_t hq, int64_t hkv, int64_t d, float scale, int64_t window) {
  const int64_t group = hq / hkv;
  ex.pool().parallel_dynamic(nq * hq, [&](int64_t item, int) {
    const int64_t i = item / hq, h = item % hq, kh = h / group;
    const int64_t last = length - nq + i;  // attends to cache rows [first, last]
    const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
    const float* qi = q + (i * hq + h) * d;
    float* oi = out + (i * hq + h) * d;
    std::vector<float> acc(size_t(d), 0.f);
    float m = -INFINITY, l = 0.f;
    for (int64_t j = first; j <= last; j++) {
      const float* kj = k_cache + (j * hkv + kh) * d;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < d; c++) s += qi[c] * kj[c];
      s *= scale;
      float mn = std::max(m, s);
      float corr = std::exp(m - mn), p = std::exp(s - mn);
      const float* vj = v_cache + (j * hkv + kh) * d;
      for (int64_t c = 0; c < d; c++) acc[size_t(c)] = acc[size_t(c)] * corr + p * vj[c];
      l = l * corr + p;
      m = mn;
    }
    for (int64_t c = 0; c < d; c++) oi[c] = acc[size_t(c)] / l;
  });
}

}  // namespace mlora::cpu
