// Vector types and register-blocked tile GEMMs shared by the CPU kernels that are written once
// and compiled per instruction set (attention.cc, lora.cc). Each of the namespaces
// simd::portable, simd::avx2 and simd::avx512 defines
//   V       the vector type's operations (V::W floats per vector),
//   MR, NV  the micro-tile: MR rows × NV vectors of the output held in registers (MR1 rows
//           when the output is one vector wide),
// and tile_gemm.inc's micro-tiles and tile_gemm compiled for it. A kernel file then reopens a
// namespace, defines TT as MLORA_TT_<ISA> and includes its own tile code, which is compiled
// with that instruction set (function-level target attributes: the rest of the binary stays
// plain x86-64, and no function of one instruction set is ever shared with another).
// Everything is in an unnamed namespace: each including file gets its own copies.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "cpu_features.h"
#include "vmath.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MLORA_SIMD_X86 1
#define MLORA_TT_AVX2 __attribute__((target("avx2,fma")))
#define MLORA_TT_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif
#define MLORA_TT_PORTABLE
// GCC 12's avx512fintrin.h builds several intrinsics (max, min, shifts, conversions) on
// _mm512_undefined_ps, which its own -Wmaybe-uninitialized then reports wherever they inline.
#define MLORA_SIMD_AVX512_WARNINGS_OFF                                                       \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define MLORA_SIMD_AVX512_WARNINGS_ON _Pragma("GCC diagnostic pop")

namespace mlora::cpu::simd {
namespace {

// bt[c·ldb + jj] = x[row jj][c] for rows j0 <= jj < nb, zero-padded to ldb columns.
inline void pack_transposed_scalar(float* bt, int64_t ldb, const float* x, int64_t stride, int64_t j0, int64_t nb,
                                   int64_t d) {
  for (int64_t jj = j0; jj < nb; jj++) {
    const float* src = x + jj * stride;
    for (int64_t c = 0; c < d; c++) bt[c * ldb + jj] = src[c];
  }
  if (nb < ldb)
    for (int64_t c = 0; c < d; c++) std::fill(bt + c * ldb + nb, bt + (c + 1) * ldb, 0.f);
}

// ---- portable: plain floats, 4×4 micro-tiles (the compiler may still vectorise).
namespace portable {
#define TT MLORA_TT_PORTABLE
struct V {
  using T = float;
  static constexpr int W = 1;
  static T zero() { return 0.f; }
  static T set1(float x) { return x; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T x) { *p = x; }
  static T bcast(const float* p) { return *p; }
  static T fmadd(T a, T b, T c) { return a * b + c; }
  static T mul(T a, T b) { return a * b; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T max(T a, T b) { return std::max(a, b); }
  static float hmax(T x) { return x; }
  static float hsum(T x) { return x; }
  static T exp(T x) { return exp_approx(x); }
  static T select_finite(T x) { return x == -std::numeric_limits<float>::infinity() ? 0.f : x; }
  static void pack_transposed(float* bt, int64_t ldb, const float* x, int64_t stride, int64_t nb, int64_t d) {
    pack_transposed_scalar(bt, ldb, x, stride, 0, nb, d);
  }
};
constexpr int MR = 4, NV = 4, MR1 = 4;
#include "tile_gemm.inc"
#undef TT
}  // namespace portable

#ifdef MLORA_SIMD_X86
// ---- AVX2 + FMA: 6×16 micro-tiles (12 of the 16 ymm registers accumulate).
namespace avx2 {
#define TT MLORA_TT_AVX2
struct V {
  using T = __m256;
  static constexpr int W = 8;
  static TT T zero() { return _mm256_setzero_ps(); }
  static TT T set1(float x) { return _mm256_set1_ps(x); }
  static TT T load(const float* p) { return _mm256_loadu_ps(p); }
  static TT void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static TT T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static TT T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static TT T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static TT T add(T a, T b) { return _mm256_add_ps(a, b); }
  static TT T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static TT T max(T a, T b) { return _mm256_max_ps(a, b); }
  static TT float hmax(T x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  static TT float hsum(T x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  // vmath.h's exp_approx, 8 lanes at a time (same reduction and polynomial), except that
  // results below e^-80 (~2e-35) are flushed to 0 rather than computed: near e^-87 the
  // product p·2^n is denormal, and every denormal result costs a microcode assist (masked
  // scores, exp(−inf), are exactly that case). A softmax term that small is invisible next to
  // the row's largest, exp(0) = 1.
  static TT T exp(T x) {
    const T lo = set1(-80.f), hi = set1(88.72283905f);
    const T under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    const T xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // NaN stays NaN (max/min return operand 2)
    const T n =
        _mm256_round_ps(_mm256_mul_ps(xc, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm256_fnmadd_ps(n, set1(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    T p = set1(1.9875691500e-4f);
    p = fmadd(p, r, set1(1.3981999507e-3f));
    p = fmadd(p, r, set1(8.3334519073e-3f));
    p = fmadd(p, r, set1(4.1665795894e-2f));
    p = fmadd(p, r, set1(1.6666665459e-1f));
    p = fmadd(p, r, set1(5.0000001201e-1f));
    p = fmadd(mul(p, r), r, add(r, set1(1.f)));
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const T s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const T s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    const T y = _mm256_andnot_ps(under, mul(mul(p, s1), s2));
    return _mm256_blendv_ps(y, set1(std::numeric_limits<float>::infinity()), over);
  }
  static TT T select_finite(T x) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ), x);
  }
  // 8×8 blocks transposed in registers (d is a multiple of 8 on this path); the rows of a
  // partial last block one by one.
  static TT void pack_transposed(float* bt, int64_t ldb, const float* x, int64_t stride, int64_t nb, int64_t d) {
    int64_t jj = 0;
    for (; jj + 8 <= nb; jj += 8)
      for (int64_t c = 0; c < d; c += 8) {
        T r[8];
        for (int i = 0; i < 8; i++) r[i] = load(x + (jj + i) * stride + c);
        transpose8(r);
        for (int i = 0; i < 8; i++) store(bt + (c + i) * ldb + jj, r[i]);
      }
    pack_transposed_scalar(bt, ldb, x, stride, jj, nb, d);
  }
  static TT void transpose8(T* r) {
    const T t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const T t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const T t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const T t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const T u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
            u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const T u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
            u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const T u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
            u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const T u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
            u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
  }
};
constexpr int MR = 6, NV = 2, MR1 = 12;
#include "tile_gemm.inc"
#undef TT
}  // namespace avx2

// ---- AVX-512F: 8×32 micro-tiles (16 zmm accumulators).
MLORA_SIMD_AVX512_WARNINGS_OFF
namespace avx512 {
#define TT MLORA_TT_AVX512
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static TT T zero() { return _mm512_setzero_ps(); }
  static TT T set1(float x) { return _mm512_set1_ps(x); }
  static TT T load(const float* p) { return _mm512_loadu_ps(p); }
  static TT void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static TT T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static TT T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static TT T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static TT T add(T a, T b) { return _mm512_add_ps(a, b); }
  static TT T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static TT T max(T a, T b) { return _mm512_max_ps(a, b); }
  static TT float hmax(T x) { return _mm512_reduce_max_ps(x); }
  static TT float hsum(T x) { return _mm512_reduce_add_ps(x); }
  // As avx2::V::exp (results below e^-80 flushed to 0), with the 2^n of the result applied
  // by vscalefps, which saturates to inf by itself.
  static TT T exp(T x) {
    const T lo = set1(-80.f), hi = set1(88.72283905f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    const T xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));  // NaN stays NaN (max/min return operand 2)
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(xc, set1(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm512_fnmadd_ps(n, set1(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    T p = set1(1.9875691500e-4f);
    p = fmadd(p, r, set1(1.3981999507e-3f));
    p = fmadd(p, r, set1(8.3334519073e-3f));
    p = fmadd(p, r, set1(4.1665795894e-2f));
    p = fmadd(p, r, set1(1.6666665459e-1f));
    p = fmadd(p, r, set1(5.0000001201e-1f));
    p = fmadd(mul(p, r), r, add(r, set1(1.f)));
    const T y = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(__mmask16(~under), y);
  }
  static TT T select_finite(T x) {
    return _mm512_maskz_mov_ps(
        __mmask16(~_mm512_cmp_ps_mask(x, set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ)), x);
  }
  static TT void pack_transposed(float* bt, int64_t ldb, const float* x, int64_t stride, int64_t nb, int64_t d) {
    avx2::V::pack_transposed(bt, ldb, x, stride, nb, d);
  }
};
constexpr int MR = 8, NV = 2, MR1 = 12;
#include "tile_gemm.inc"
#undef TT
}  // namespace avx512
MLORA_SIMD_AVX512_WARNINGS_ON
#endif

// Which instruction set to run: the widest this CPU has whose vector width divides every
// `widths` entry, unless MLORA_GEMM_KERNEL (scalar|avx2|avx512, read at each call, as the GEMM
// reads it once) asks for a narrower one.
enum class Isa { Portable, Avx2, Avx512 };
inline Isa pick_isa(std::initializer_list<int64_t> widths) {
#ifdef MLORA_SIMD_X86
  const CpuFeatures& f = cpu_features();
  const char* env = std::getenv("MLORA_GEMM_KERNEL");
  const std::string want = env ? env : "";
  if (want == "scalar") return Isa::Portable;
  auto divides = [&](int w) {
    for (int64_t x : widths)
      if (x % w != 0) return false;
    return true;
  };
  const bool has_avx2 = f.avx2 && f.fma, has_avx512 = has_avx2 && f.avx512f && want != "avx2";
  if (has_avx512 && divides(avx512::V::W)) return Isa::Avx512;
  if (has_avx2 && divides(avx2::V::W)) return Isa::Avx2;
#else
  (void)widths;
#endif
  return Isa::Portable;
}

// The variant of a function compiled per instruction set (NAME_portable, NAME_avx2,
// NAME_avx512) that pick_isa(widths...) chooses at this call.
template <class F>
F pick_variant(Isa isa, F portable, [[maybe_unused]] F avx2, [[maybe_unused]] F avx512) {
  return isa == Isa::Avx512 ? avx512 : isa == Isa::Avx2 ? avx2 : portable;
}
#ifdef MLORA_SIMD_X86
#define MLORA_SIMD_PICK(NAME, ...)                                                                            \
  ::mlora::cpu::simd::pick_variant(::mlora::cpu::simd::pick_isa({__VA_ARGS__}), NAME##_portable, NAME##_avx2, \
                                   NAME##_avx512)
#else
#define MLORA_SIMD_PICK(NAME, ...) NAME##_portable
#endif

}  // namespace
}  // namespace mlora::cpu::simd
