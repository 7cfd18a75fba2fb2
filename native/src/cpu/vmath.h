// Vectorisable scalar math for the elementwise kernels (swiglu, cross_entropy). Written so
// that `#pragma omp simd` loops compile to SSE2/AVX code without -ffast-math: no calls into
// libm, no branches (selects only), bit casts through memcpy.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace mlora::cpu {

// exp(x) for float, max relative error ≈ 2e-7 on [-87.3, 88.7] (Cody–Waite reduction by ln 2,
// then Cephes' degree-6 polynomial for exp on [-ln2/2, ln2/2]). Below -87.33 (where the result
// would be denormal) it returns 0, above 88.72 +inf; NaN stays NaN.
static inline float exp_approx(float x) {
  const float hi = 88.72283905f, lo = -87.33654475f;
  // Clamp and, at the end, out-of-range and NaN results by integer bit selects: with float
  // `cond ? a : b` GCC threads the branches (duplicating the polynomial per case) or keeps
  // possibly-trapping arithmetic on one branch, and does not vectorise without -fno-trapping-math.
  uint32_t xb, lob, hib;
  std::memcpy(&xb, &x, 4);
  std::memcpy(&lob, &lo, 4);
  std::memcpy(&hib, &hi, 4);
  const uint32_t under = 0u - uint32_t(x < lo), over = 0u - uint32_t(x > hi), nan = 0u - uint32_t(x != x);
  uint32_t xcb = (xb & ~under & ~over) | (lob & under) | (hib & over);  // NaN stays NaN
  float xc;
  std::memcpy(&xc, &xcb, 4);
  // n = round(x / ln2) with the 1.5·2^23 trick (round-to-nearest without SSE4.1's roundps)
  const float magic = 12582912.f;
  float t = xc * 1.44269504088896341f + magic;
  float n = t - magic;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  int32_t ni = ti - 0x4b400000;  // the integer n, read from the mantissa of t
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^n: n is in [-126, 128]; split as 2^(n/2)·2^(n - n/2) so n = 128 (x near 88.72) stays finite
  int32_t n1 = ni >> 1, n2 = ni - n1;
  // (unsigned shifts: for a NaN input ni is garbage, and a signed overflow would be UB)
  uint32_t b1 = uint32_t(n1 + 127) << 23, b2 = uint32_t(n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
  float y = p * s1 * s2;
  uint32_t yb;
  std::memcpy(&yb, &y, 4);
  yb &= ~under;                              // 0
  yb = (yb & ~over) | (0x7f800000u & over);  // +inf
  yb = (yb & ~nan) | (xb & nan);             // NaN passes through
  std::memcpy(&y, &yb, 4);
  return y;
}

// σ(x) = 1 / (1 + e^-x), exact limits: 0 for x → -inf (e^-x = inf), 1 for x → +inf.
static inline float sigmoid_approx(float x) { return 1.f / (1.f + exp_approx(-x)); }

}  // namespace mlora::cpu
