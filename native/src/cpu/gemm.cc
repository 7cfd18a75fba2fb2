// GEMM: C = alpha·op(A)·op(B) + beta·C, row-major, A in f32, B in f32/f16/bf16 (base weights).
//
// BLIS-style packed GEMM (Goto's algorithm):
//   for jc over N in NC columns            (B panel kc×nc lives in L3, shared by all threads)
//     for pc over K in KC                  (beta is applied on the first pc only, then C += …)
//       pack op(B)[pc:pc+kc, jc:jc+nc] into NR-wide slivers, converting f16/bf16 to f32
//       for ic over M in MC rows           (A block mc×kc lives in L2, one per thread)
//         pack op(A)[ic:ic+mc, pc:pc+kc] into MR-tall slivers
//         for jr over NR slivers           (one B sliver kc×NR stays in L1)
//           for ir over MR slivers: micro-kernel, an MR×NR tile of C held in registers
// Threads: B packing is split over slivers; the compute is split over rows (M) when there
// are enough MR slivers for every thread, else over NR slivers of B (small m, e.g. m = 1).
// Every thread owns a disjoint set of C tiles, so no two threads ever write the same element.
// An optional epilogue (gemm_epilogue.h) runs on each MR×NR tile of C right after its last
// K block, on the thread that computed it.
//
// Micro-kernels are picked at run time (cpu_features, or MLORA_GEMM_KERNEL=scalar|avx2|avx512
// to force one for testing): AVX-512F 12×32, AVX2+FMA 6×16 and a portable 4×8 fallback.
// Where a call's rows end inside a tile, kernels for fewer rows compute only those rows (the
// same per-row operations, so a row's bits do not depend on the call's row count).
//
// bf16 compute (WeightRef::bf16_compute): both operands are rounded to bf16 (nearest even),
// products accumulate in f32. B panels are packed as bf16 pairs, one 32-bit word per (k, k+1).
// With AMX-BF16 a 32×32 micro-kernel runs tdpbf16ps on tiles (A row-major bf16); with
// AVX512_BF16 alone a 12×32 micro-kernel runs vdpbf16ps (two multiply-adds per lane per
// instruction; on some CPUs, e.g. the AMX ones, it issues at a quarter of the FMA rate, which is
// why AMX comes first). Elsewhere the f32 kernels run on panels whose values are rounded to bf16
// while packing: the same products, so the same numbers up to summation order.
//
// Quantized weights (nf4, nf4dq, int8) are dequantized while B is packed (pack_b_quant).
// A frozen weight can be packed once instead (gemm_pack_panels, WeightRef::panels: every B panel
// of the call, in loop order, with the same blocking): the GEMM then skips the packing step.
// Function-level `target` attributes keep the rest of the binary plain x86-64.
//
// Scratch: the B panel and one A block per pool thread live in one 64-byte aligned buffer
// owned by the *calling* thread (thread_local), grown on demand and then reused, so
// repeated calls take no page faults. It is allocated before any worker starts (a failed
// allocation is an Error on the caller, never an exception inside a pool thread).
// Scratch bytes are not counted against the device budget (at most ~5 MiB per calling thread).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../kernels.h"
#include "cpu_features.h"
#include "gemm_epilogue.h"
#include "quant.h"
#include "simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MLORA_X86 1
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
#endif

namespace mlora {
using cpu::dequant_run;
using cpu::Isa;
namespace {

// ---------------------------------------------------------------------------------------
// Kernel table

// Computes the full MR×NR tile acc = A_sliver·B_sliver over kc and writes
// c[i*ldc + j] = alpha·acc + beta·c (c is not read when beta == 0).
using MicroKernel = void (*)(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                             float beta);
// Micro-kernels for the bottom edge: rows[r] computes only the first r < MR rows of a full-width
// tile (the sliver is still MR tall) and writes them straight to C. Each row gets the same
// operations in the same order as in a full tile, so a row's bits never depend on where the
// call's rows end (a 256-row message and a 1024-row batch agree row for row), and a
// 256-row call no longer pays a full 12-row tile plus a copy for its last 4 rows.
using RowKernels = const MicroKernel*;
// Packs op(B)[p0:p0+kc, j0:j0+jn] into dst[p*nr + jj] (jj ≥ jn zero-filled).
using PackB = void (*)(float* dst, WeightRef b, bool trans, int64_t ldb, int64_t p0, int64_t kc, int64_t j0, int64_t jn,
                       int nr);
// Packs op(A)[i0:i0+im, p0:p0+kc] into dst[p*mr + ii] (ii ≥ im zero-filled).
using PackA = void (*)(float* dst, const float* a, bool trans, int64_t lda, int64_t i0, int64_t im, int64_t p0,
                       int64_t kc, int mr);
using FmaPeak = double (*)(int64_t iters);  // returns flops done

// Turns an f32 B sliver [kc][nr] into bf16 pairs [ceil(kc/2)][nr] (32-bit words, k even in the low half).
using PackPairs = void (*)(uint32_t* dst, const float* src, int64_t kc, int nr);

struct GemmKernel {
  const char* name;
  Isa isa;  // of the dequantizer quantized weights go through (quant.cc)
  int mr, nr;
  int64_t mc, kc, nc;  // cache blocking: mc % mr == 0, nc % nr == 0
  MicroKernel ukr;
  PackA pack_a;
  PackB pack_b;  // f32 slivers (for a bf16-pair kernel: the f32 sliver that pairs converts)
  FmaPeak peak;
  PackPairs pairs = nullptr;  // set: panels hold bf16 pairs (the ukr reads ceil(kc/2) words per row)
  bool round_b = false;       // bf16 emulation: B values rounded to bf16 after packing
  int kpad = 2;               // pairs kernels: k is zero-padded to a multiple of this (AMX tiles: 32)
  RowKernels rows = nullptr;  // [MR] entries (rows[0] unused); null: edge tiles go through a buffer
};

// Packed words per row of a sliver for a k block of kc values.
inline int64_t packed_k(const GemmKernel& K, int64_t kc) {
  return K.pairs ? (kc + K.kpad - 1) / K.kpad * K.kpad / 2 : kc;
}

constexpr int kMaxMR = 32, kMaxNR = 32;

// ---------------------------------------------------------------------------------------
// Portable parts

template <DType DT>
inline float load_w(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) return static_cast<const float*>(p)[i];
  if constexpr (DT == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <DType DT>
void pack_b_scalar_t(float* dst, const void* b, bool trans, int64_t ldb, int64_t p0, int64_t kc, int64_t j0, int64_t jn,
                     int nr) {
  if (!trans) {
    for (int64_t p = 0; p < kc; p++) {
      float* d = dst + p * nr;
      int64_t base = (p0 + p) * ldb + j0;
      for (int64_t jj = 0; jj < jn; jj++) d[jj] = load_w<DT>(b, base + jj);
      for (int64_t jj = jn; jj < nr; jj++) d[jj] = 0.f;
    }
  } else {
    if (jn < nr) std::memset(dst, 0, sizeof(float) * size_t(kc * nr));
    for (int64_t jj = 0; jj < jn; jj++) {
      int64_t base = (j0 + jj) * ldb + p0;
      for (int64_t p = 0; p < kc; p++) dst[p * nr + jj] = load_w<DT>(b, base + p);
    }
  }
}

void pack_b_scalar(float* dst, WeightRef b, bool trans, int64_t ldb, int64_t p0, int64_t kc, int64_t j0, int64_t jn,
                   int nr) {
  switch (b.dtype) {
    case DType::BF16: return pack_b_scalar_t<DType::BF16>(dst, b.ptr, trans, ldb, p0, kc, j0, jn, nr);
    case DType::F16: return pack_b_scalar_t<DType::F16>(dst, b.ptr, trans, ldb, p0, kc, j0, jn, nr);
    default: return pack_b_scalar_t<DType::F32>(dst, b.ptr, trans, ldb, p0, kc, j0, jn, nr);
  }
}

void pack_a_generic(float* dst, const float* a, bool trans, int64_t lda, int64_t i0, int64_t im, int64_t p0, int64_t kc,
                    int mr) {
  if (trans) {  // op(A)[i, p] = a[p*lda + i]: mr contiguous values per p
    for (int64_t p = 0; p < kc; p++) {
      const float* s = a + (p0 + p) * lda + i0;
      float* d = dst + p * mr;
      int64_t ii = 0;
      for (; ii < im; ii++) d[ii] = s[ii];
      for (; ii < mr; ii++) d[ii] = 0.f;
    }
    return;
  }
  // op(A)[i, p] = a[i*lda + p]: read each row contiguously, write with stride mr (the
  // destination sliver, kc·mr floats, stays in L1).
  for (int64_t ii = 0; ii < im; ii++) {
    const float* s = a + (i0 + ii) * lda + p0;
    float* d = dst + ii;
    for (int64_t p = 0; p < kc; p++) d[p * mr] = s[p];
  }
  for (int64_t ii = im; ii < mr; ii++)
    for (int64_t p = 0; p < kc; p++) dst[p * mr + ii] = 0.f;
}

constexpr int SC_MR = 4, SC_NR = 8;

void ukr_scalar(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha, float beta) {
  float acc[SC_MR][SC_NR] = {};
  for (int64_t p = 0; p < kc; p++) {
    for (int i = 0; i < SC_MR; i++) {
      float av = a[p * SC_MR + i];
      for (int j = 0; j < SC_NR; j++) acc[i][j] += av * b[p * SC_NR + j];
    }
  }
  for (int i = 0; i < SC_MR; i++) {
    float* ci = c + i * ldc;
    if (beta == 0.f)
      for (int j = 0; j < SC_NR; j++) ci[j] = alpha * acc[i][j];
    else
      for (int j = 0; j < SC_NR; j++) ci[j] = alpha * acc[i][j] + beta * ci[j];
  }
}

// FMA throughput of one instruction set: CHAINS independent multiply-add chains of simd.h's V
// vectors (enough to cover the FMA latency on both pipes), so the loop measures throughput, not
// latency. Returns the flops done.
#define MLORA_FMA_PEAK(NAME, TARGET, NS, CHAINS)                                             \
  TARGET double NAME(int64_t iters) {                                                        \
    using V = cpu::simd::NS::V;                                                              \
    typename V::T x[CHAINS];                                                                 \
    for (int i = 0; i < CHAINS; i++) x[i] = V::set1(1.0f + 0.01f * float(i));                \
    const typename V::T m = V::set1(0.999999f), d = V::set1(1e-7f);                          \
    for (int64_t t = 0; t < iters; t++) {                                                    \
      _Pragma("GCC unroll 16") for (int i = 0; i < CHAINS; i++) x[i] = V::fmadd(x[i], m, d); \
    }                                                                                        \
    typename V::T s = x[0];                                                                  \
    for (int i = 1; i < CHAINS; i++) s = V::add(s, x[i]);                                    \
    volatile float sink = V::hsum(s);                                                        \
    (void)sink;                                                                              \
    return double(iters) * CHAINS * V::W * 2;                                                \
  }

MLORA_FMA_PEAK(peak_scalar, , portable, 8)

// ---------------------------------------------------------------------------------------
// AVX2 + FMA (+F16C for f16 weights): 6×16 micro-kernel, 12 ymm accumulators

#ifdef MLORA_X86

AVX2_TARGET inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                                   __m256& r7) {
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// 8 consecutive weights starting at element i, as f32
template <DType DT>
AVX2_TARGET inline __m256 load8_w(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (DT == DType::BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_cvtph_ps(h);
  }
}

template <DType DT>
AVX2_TARGET void pack_b_avx2_t(float* dst, const void* b, bool trans, int64_t ldb, int64_t p0, int64_t kc, int64_t j0,
                               int64_t jn, int nr) {
  if (!trans) {  // rows of op(B) are contiguous: convert jn values per p
    for (int64_t p = 0; p < kc; p++) {
      float* d = dst + p * nr;
      int64_t base = (p0 + p) * ldb + j0;
      int64_t jj = 0;
      for (; jj + 8 <= jn; jj += 8) _mm256_store_ps(d + jj, load8_w<DT>(b, base + jj));
      for (; jj < jn; jj++) d[jj] = load_w<DT>(b, base + jj);
      for (; jj < nr; jj++) d[jj] = 0.f;
    }
    return;
  }
  // op(B)[p, j] = b[j*ldb + p]: 8×8 register transposes (8 weight rows × 8 k values)
  if (jn < nr) std::memset(dst, 0, sizeof(float) * size_t(kc * nr));
  int64_t jj = 0;
  for (; jj + 8 <= jn; jj += 8) {
    const int64_t r = (j0 + jj) * ldb + p0;
    int64_t p = 0;
    for (; p + 8 <= kc; p += 8) {
      __m256 v0 = load8_w<DT>(b, r + 0 * ldb + p), v1 = load8_w<DT>(b, r + 1 * ldb + p);
      __m256 v2 = load8_w<DT>(b, r + 2 * ldb + p), v3 = load8_w<DT>(b, r + 3 * ldb + p);
      __m256 v4 = load8_w<DT>(b, r + 4 * ldb + p), v5 = load8_w<DT>(b, r + 5 * ldb + p);
      __m256 v6 = load8_w<DT>(b, r + 6 * ldb + p), v7 = load8_w<DT>(b, r + 7 * ldb + p);
      transpose8(v0, v1, v2, v3, v4, v5, v6, v7);
      float* d = dst + p * nr + jj;
      _mm256_store_ps(d + 0 * nr, v0);
      _mm256_store_ps(d + 1 * nr, v1);
      _mm256_store_ps(d + 2 * nr, v2);
      _mm256_store_ps(d + 3 * nr, v3);
      _mm256_store_ps(d + 4 * nr, v4);
      _mm256_store_ps(d + 5 * nr, v5);
      _mm256_store_ps(d + 6 * nr, v6);
      _mm256_store_ps(d + 7 * nr, v7);
    }
    for (; p < kc; p++)
      for (int q = 0; q < 8; q++) dst[p * nr + jj + q] = load_w<DT>(b, r + q * ldb + p);
  }
  for (; jj < jn; jj++) {
    const int64_t r = (j0 + jj) * ldb + p0;
    for (int64_t p = 0; p < kc; p++) dst[p * nr + jj] = load_w<DT>(b, r + p);
  }
}

AVX2_TARGET void pack_b_avx2(float* dst, WeightRef b, bool trans, int64_t ldb, int64_t p0, int64_t kc, int64_t j0,
                             int64_t jn, int nr) {
  switch (b.dtype) {
    case DType::BF16: return pack_b_avx2_t<DType::BF16>(dst, b.ptr, trans, ldb, p0, kc, j0, jn, nr);
    case DType::F16: return pack_b_avx2_t<DType::F16>(dst, b.ptr, trans, ldb, p0, kc, j0, jn, nr);
    default: return pack_b_avx2_t<DType::F32>(dst, b.ptr, trans, ldb, p0, kc, j0, jn, nr);
  }
}

// A sliver for the MR-row kernels (AVX2 6×16: MR = 6, AVX-512 12×32: MR = 12) from a row-major
// (non-transposed) A, 8 k values per step: rows 0..7 by an 8×8 register transpose (for MR = 6,
// rows 6 and 7 are padding), for MR = 12 rows 8..11 by a 4×8 one (two 4×4 blocks in the 128-bit
// lanes). The same values as pack_a_generic, moved without its scalar stride-MR stores.
template <int MR>
AVX2_TARGET void pack_a_rows(float* dst, const float* a, bool trans, int64_t lda, int64_t i0, int64_t im, int64_t p0,
                             int64_t kc, int mr) {
  if (trans || mr != MR || im != MR) return pack_a_generic(dst, a, trans, lda, i0, im, p0, kc, mr);
  const float* s = a + i0 * lda + p0;
  int64_t p = 0;
  for (; p + 8 <= kc; p += 8) {
    __m256 v[8];
    for (int r = 0; r < 8; r++) v[r] = r < MR ? _mm256_loadu_ps(s + r * lda + p) : _mm256_setzero_ps();
    transpose8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);  // v[t]: rows 0..7 at k = p+t
    float* d = dst + p * MR;
    if constexpr (MR == 6) {
      // keep rows 0..5: overlapping 8-wide stores, in order; the last must not write past the block
      for (int t = 0; t < 7; t++) _mm256_storeu_ps(d + t * 6, v[t]);
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, v[7]);
      std::memcpy(d + 42, tmp, 6 * sizeof(float));
    } else {
      static_assert(MR == 12, "pack_a_rows: 6 or 12 rows");
      const __m256 w8 = _mm256_loadu_ps(s + 8 * lda + p), w9 = _mm256_loadu_ps(s + 9 * lda + p);
      const __m256 w10 = _mm256_loadu_ps(s + 10 * lda + p), w11 = _mm256_loadu_ps(s + 11 * lda + p);
      const __m256 t0 = _mm256_unpacklo_ps(w8, w9), t1 = _mm256_unpackhi_ps(w8, w9);
      const __m256 t2 = _mm256_unpacklo_ps(w10, w11), t3 = _mm256_unpackhi_ps(w10, w11);
      // u[t]: rows 8..11 at k = p+t (low lane) and k = p+t+4 (high lane)
      const __m256 u[4] = {
          _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
          _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2))};
      for (int t = 0; t < 8; t++) {
        _mm256_storeu_ps(d + t * 12, v[t]);
        _mm_storeu_ps(d + t * 12 + 8, t < 4 ? _mm256_castps256_ps128(u[t]) : _mm256_extractf128_ps(u[t - 4], 1));
      }
    }
  }
  for (; p < kc; p++)
    for (int ii = 0; ii < MR; ii++) dst[p * MR + ii] = s[ii * lda + p];
}

constexpr int AVX2_MR = 6, AVX2_NR = 16;

// c = alpha·acc + beta·c for a 6×16 tile's first R rows (c is not read when beta == 0).
template <int R>
AVX2_TARGET inline void store_tile_avx2(const __m256 (&acc)[R][2], float* c, int64_t ldc, float alpha, float beta) {
  const __m256 va = _mm256_set1_ps(alpha);
  if (beta == 0.f) {
    for (int i = 0; i < R; i++) {
      _mm256_storeu_ps(c + i * ldc, _mm256_mul_ps(va, acc[i][0]));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_mul_ps(va, acc[i][1]));
    }
  } else if (beta == 1.f) {
    for (int i = 0; i < R; i++) {
      _mm256_storeu_ps(c + i * ldc, _mm256_fmadd_ps(va, acc[i][0], _mm256_loadu_ps(c + i * ldc)));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_fmadd_ps(va, acc[i][1], _mm256_loadu_ps(c + i * ldc + 8)));
    }
  } else {
    const __m256 vb = _mm256_set1_ps(beta);
    for (int i = 0; i < R; i++) {
      _mm256_storeu_ps(c + i * ldc, _mm256_fmadd_ps(va, acc[i][0], _mm256_mul_ps(vb, _mm256_loadu_ps(c + i * ldc))));
      _mm256_storeu_ps(c + i * ldc + 8,
                       _mm256_fmadd_ps(va, acc[i][1], _mm256_mul_ps(vb, _mm256_loadu_ps(c + i * ldc + 8))));
    }
  }
}

AVX2_TARGET void ukr_avx2_6x16(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                               float alpha, float beta) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps(),
         c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(),
         c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int i = 0; i < AVX2_MR; i++) {  // both ends of each 64-byte row segment (C may be unaligned)
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 15), _MM_HINT_T0);
  }
  // The k loop is written in inline assembly: GCC's register allocation of 12 accumulators
  // plus 2 B vectors and the A broadcast (15 of 16 ymm) spilled inside the loop. Registers:
  // accumulators are compiler-chosen "+x" operands, ymm12/13 hold the B row, ymm14/15 A.
#define MLORA_AVX2_STEP(OFF_A, OFF_B)        \
  "vmovaps " #OFF_B                          \
  "(%[b]), %%ymm12\n\t"                      \
  "vmovaps " #OFF_B                          \
  "+32(%[b]), %%ymm13\n\t"                   \
  "vbroadcastss " #OFF_A                     \
  "(%[a]), %%ymm14\n\t"                      \
  "vfmadd231ps %%ymm12, %%ymm14, %[c00]\n\t" \
  "vfmadd231ps %%ymm13, %%ymm14, %[c01]\n\t" \
  "vbroadcastss " #OFF_A                     \
  "+4(%[a]), %%ymm15\n\t"                    \
  "vfmadd231ps %%ymm12, %%ymm15, %[c10]\n\t" \
  "vfmadd231ps %%ymm13, %%ymm15, %[c11]\n\t" \
  "vbroadcastss " #OFF_A                     \
  "+8(%[a]), %%ymm14\n\t"                    \
  "vfmadd231ps %%ymm12, %%ymm14, %[c20]\n\t" \
  "vfmadd231ps %%ymm13, %%ymm14, %[c21]\n\t" \
  "vbroadcastss " #OFF_A                     \
  "+12(%[a]), %%ymm15\n\t"                   \
  "vfmadd231ps %%ymm12, %%ymm15, %[c30]\n\t" \
  "vfmadd231ps %%ymm13, %%ymm15, %[c31]\n\t" \
  "vbroadcastss " #OFF_A                     \
  "+16(%[a]), %%ymm14\n\t"                   \
  "vfmadd231ps %%ymm12, %%ymm14, %[c40]\n\t" \
  "vfmadd231ps %%ymm13, %%ymm14, %[c41]\n\t" \
  "vbroadcastss " #OFF_A                     \
  "+20(%[a]), %%ymm15\n\t"                   \
  "vfmadd231ps %%ymm12, %%ymm15, %[c50]\n\t" \
  "vfmadd231ps %%ymm13, %%ymm15, %[c51]\n\t"
#define MLORA_AVX2_OPERANDS                                                                                 \
  [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21),     \
      [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41), [c50] "+x"(c50), [c51] "+x"(c51), \
      [a] "+r"(a), [b] "+r"(b), [n] "+r"(n)
  int64_t n = kc / 4;
  if (n > 0) {
    __asm__ volatile(
        "1:\n\t"
        "prefetcht0 512(%[b])\n\t"
        MLORA_AVX2_STEP(0, 0)
        MLORA_AVX2_STEP(24, 64)
        MLORA_AVX2_STEP(48, 128)
        MLORA_AVX2_STEP(72, 192)
        "add $96, %[a]\n\t"
        "add $256, %[b]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        : MLORA_AVX2_OPERANDS
        :
        : "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
  }
  n = kc % 4;
  if (n > 0) {
    __asm__ volatile(
        "1:\n\t"
        MLORA_AVX2_STEP(0, 0)
        "add $24, %[a]\n\t"
        "add $64, %[b]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        : MLORA_AVX2_OPERANDS
        :
        : "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
  }
#undef MLORA_AVX2_STEP
#undef MLORA_AVX2_OPERANDS
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  store_tile_avx2<AVX2_MR>(acc, c, ldc, alpha, beta);
}

// The first R < 6 rows of a 6×16 tile: 2R ymm accumulators leave GCC enough registers, so no
// assembly; the same multiply-adds in the same order as the full tile's.
template <int R>
AVX2_TARGET void ukr_avx2_rows(int64_t kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                               float alpha, float beta) {
  __m256 acc[R][2];
  for (int i = 0; i < R; i++) {
    acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 15), _MM_HINT_T0);
  }
  for (int64_t p = 0; p < kc; p++) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < R; i++) {
      const __m256 av = _mm256_broadcast_ss(a + i);
      acc[i][0] = _mm256_fmadd_ps(b0, av, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(b1, av, acc[i][1]);
    }
    a += AVX2_MR;
    b += AVX2_NR;
  }
  store_tile_avx2<R>(acc, c, ldc, alpha, beta);
}

constexpr MicroKernel kRowsAvx2[AVX2_MR] = {
    nullptr, ukr_avx2_rows<1>, ukr_avx2_rows<2>, ukr_avx2_rows<3>, ukr_avx2_rows<4>, ukr_avx2_rows<5>,
};

MLORA_FMA_PEAK(peak_avx2, AVX2_TARGET, avx2, 12)

// ---------------------------------------------------------------------------------------
// AVX-512F: 12×32 micro-kernel, 24 zmm accumulators (packing reuses the AVX2 routines)

constexpr int AVX512_MR = 12, AVX512_NR = 32;

// Zeroes the accumulators of a tile's first R rows and prefetches those C rows.
template <int R>
AVX512_TARGET inline void init_tile_avx512(__m512 (&acc)[R][2], const float* c, int64_t ldc) {
#pragma GCC unroll 12
  for (int i = 0; i < R; i++) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = _mm512_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 31), _MM_HINT_T0);
  }
}

// c = alpha·acc + beta·c for a tile's first R rows (c is not read when beta == 0).
template <int R>
AVX512_TARGET inline void store_tile_avx512(const __m512 (&acc)[R][2], float* c, int64_t ldc, float alpha, float beta) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 12
  for (int i = 0; i < R; i++) {
    float* ci = c + i * ldc;
    __m512 r0 = _mm512_mul_ps(va, acc[i][0]), r1 = _mm512_mul_ps(va, acc[i][1]);
    if (beta != 0.f) {
      r0 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci), r0);
      r1 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci + 16), r1);
    }
    _mm512_storeu_ps(ci, r0);
    _mm512_storeu_ps(ci + 16, r1);
  }
}

// The first R rows of a 12×32 tile (R = 12: the full tile), 2R zmm accumulators.
template <int R>
AVX512_TARGET void ukr_avx512_rows(int64_t kc, const float* __restrict a, const float* __restrict b, float* c,
                                   int64_t ldc, float alpha, float beta) {
  __m512 acc[R][2];
  init_tile_avx512<R>(acc, c, ldc);
  for (int64_t p = 0; p < kc; p++) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 8 * 32), _MM_HINT_T0);
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < R; i++) {
      const __m512 av = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
    }
    a += AVX512_MR;
    b += AVX512_NR;
  }
  store_tile_avx512<R>(acc, c, ldc, alpha, beta);
}

// rows[0] is never called (an edge tile has at least one row)
#define MLORA_ROWS_1_TO_11(K) \
  { nullptr, K<1>, K<2>, K<3>, K<4>, K<5>, K<6>, K<7>, K<8>, K<9>, K<10>, K<11> }
constexpr MicroKernel ukr_avx512_12x32 = ukr_avx512_rows<AVX512_MR>;
constexpr MicroKernel kRowsAvx512[AVX512_MR] = MLORA_ROWS_1_TO_11(ukr_avx512_rows);

MLORA_SIMD_AVX512_WARNINGS_OFF
MLORA_FMA_PEAK(peak_avx512, AVX512_TARGET, avx512, 16)
MLORA_SIMD_AVX512_WARNINGS_ON

#endif  // MLORA_X86

// ---------------------------------------------------------------------------------------
// bf16 compute

// Emulation for CPUs without AVX512_BF16: the f32 kernel on operands rounded to bf16.
void round_bf16(float* p, int64_t n) {
  for (int64_t i = 0; i < n; i++) p[i] = bf16_to_f32(f32_to_bf16(p[i]));
}

template <PackA P>
void pack_a_round(float* dst, const float* a, bool trans, int64_t lda, int64_t i0, int64_t im, int64_t p0, int64_t kc,
                  int mr) {
  P(dst, a, trans, lda, i0, im, p0, kc, mr);
  round_bf16(dst, kc * mr);
}

#ifdef MLORA_X86
#define AVX512BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))

// A sliver as bf16 pairs: dst[q*mr + ii] = (a[i, p0+2q], a[i, p0+2q+1]). A row converted to bf16
// contiguously already is its pairs in order; they are then spread to stride mr.
AVX512BF16_TARGET void pack_a_pairs(float* dst_f, const float* a, bool trans, int64_t lda, int64_t i0, int64_t im,
                                    int64_t p0, int64_t kc, int mr) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(dst_f);
  const int64_t kw = (kc + 1) / 2;
  if (trans || im < mr) std::memset(dst, 0, size_t(kw * mr) * 4);
  if (trans) {  // op(A)[i, p] = a[p*lda + i] (LoRA-style products; not on the base GEMMs' hot path)
    for (int64_t p = 0; p < kc; p++)
      for (int64_t ii = 0; ii < im; ii++) {
        uint32_t h = f32_to_bf16(a[(p0 + p) * lda + i0 + ii]);
        dst[(p >> 1) * mr + ii] |= (p & 1) ? h << 16 : h;
      }
    return;
  }
  alignas(64) uint32_t row[512];
  for (int64_t ii = 0; ii < im; ii++) {
    const float* s = a + (i0 + ii) * lda + p0;
    for (int64_t q0 = 0; q0 < kw; q0 += 512) {  // kc ≤ 1024 per chunk of row
      const int64_t qn = std::min<int64_t>(512, kw - q0), p_end = std::min(kc, 2 * (q0 + qn));
      int64_t p = 2 * q0;
      for (; p + 32 <= p_end; p += 32) {
        __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + p + 16), _mm512_loadu_ps(s + p));
        _mm512_store_si512(reinterpret_cast<__m512i*>(row + (p / 2 - q0)), reinterpret_cast<__m512i&>(h));
      }
      for (; p < p_end; p += 2) {
        uint32_t lo = f32_to_bf16(s[p]), hi = p + 1 < kc ? f32_to_bf16(s[p + 1]) : 0;
        row[p / 2 - q0] = lo | (hi << 16);
      }
      for (int64_t q = 0; q < qn; q++) dst[(q0 + q) * mr + ii] = row[q];
    }
  }
}

MLORA_SIMD_AVX512_WARNINGS_OFF
AVX512BF16_TARGET void pairs_avx512(uint32_t* dst, const float* src, int64_t kc, int nr) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; p += 2) {
    const float* r0 = src + p * nr;
    const float* r1 = r0 + nr;
    uint32_t* d = dst + (p / 2) * nr;
    for (int j = 0; j < nr; j += 16) {
      const __m512 v0 = _mm512_loadu_ps(r0 + j), v1 = p + 1 < kc ? _mm512_loadu_ps(r1 + j) : zero;
      __m256bh h0 = _mm512_cvtneps_pbh(v0), h1 = _mm512_cvtneps_pbh(v1);
      const __m512i w0 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(h0));
      const __m512i w1 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i&>(h1));
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(d + j), _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16)));
    }
  }
}
MLORA_SIMD_AVX512_WARNINGS_ON

// The first R rows of a 12×32 tile over ceil(kc/2) bf16 pairs: per pair, 2 B vectors, R broadcast
// A pairs, 2R vdpbf16ps.
template <int R>
AVX512BF16_TARGET void ukr_avx512bf16_rows(int64_t kc, const float* __restrict a_f, const float* __restrict b_f,
                                           float* c, int64_t ldc, float alpha, float beta) {
  const uint32_t* a = reinterpret_cast<const uint32_t*>(a_f);
  const uint32_t* b = reinterpret_cast<const uint32_t*>(b_f);
  __m512 acc[R][2];
  init_tile_avx512<R>(acc, c, ldc);
  const int64_t kw = (kc + 1) / 2;
  for (int64_t q = 0; q < kw; q++) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 8 * 32), _MM_HINT_T0);
    const __m512i b0i = _mm512_load_si512(b), b1i = _mm512_load_si512(b + 16);
    const __m512bh b0 = reinterpret_cast<const __m512bh&>(b0i), b1 = reinterpret_cast<const __m512bh&>(b1i);
#pragma GCC unroll 12
    for (int i = 0; i < R; i++) {
      const __m512i avi = _mm512_set1_epi32(int(a[i]));
      const __m512bh av = reinterpret_cast<const __m512bh&>(avi);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
    }
    a += AVX512_MR;
    b += AVX512_NR;
  }
  store_tile_avx512<R>(acc, c, ldc, alpha, beta);
}

constexpr MicroKernel ukr_avx512bf16_12x32 = ukr_avx512bf16_rows<AVX512_MR>;
constexpr MicroKernel kRowsAvx512Bf16[AVX512_MR] = MLORA_ROWS_1_TO_11(ukr_avx512bf16_rows);

AVX512BF16_TARGET double peak_avx512bf16(int64_t iters) {
  // 24 independent vdpbf16ps chains (as many as the micro-kernel keeps), 32 multiply-adds each.
  __m512 x[24];
  for (int i = 0; i < 24; i++) x[i] = _mm512_set1_ps(1.0f + 0.01f * float(i));
  __m512i ai = _mm512_set1_epi32(0x3f7f3f7f), bi = _mm512_set1_epi32(0x33d633d6);  // ~0.996, ~1e-7
  for (int64_t t = 0; t < iters; t++) {
    const __m512bh a = reinterpret_cast<const __m512bh&>(ai), b = reinterpret_cast<const __m512bh&>(bi);
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++) x[i] = _mm512_dpbf16_ps(x[i], a, b);
    __asm__ volatile("" : "+v"(ai));  // keeps the operands in registers, opaque to the optimiser
  }
  __m512 s = x[0];
  for (int i = 1; i < 24; i++) s = _mm512_add_ps(s, x[i]);
  alignas(64) float out[16];
  _mm512_store_ps(out, s);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * 24 * 32 * 2;
}

// AMX (TMUL): a 32×32 tile of C in four 16×16 f32 tile registers; per 32 k values two A tiles
// (16 rows × 32 bf16) and two B tiles (16 k pairs × 16 columns) and four tdpbf16ps (16·16·32
// multiply-adds each). B slivers are the bf16-pair layout of the vdpbf16ps kernel (a tile is
// 16 pair rows of 64 bytes, stride 128); A slivers are row-major bf16, kp values per row.
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16,avx2,fma,f16c")))
constexpr int AMX_MR = 32, AMX_NR = 32, AMX_KB = 32;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

AMX_TARGET inline void amx_configure() {
  thread_local bool configured = false;  // tile configuration is per-thread CPU state
  if (configured) return;
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  configured = true;
}

// A sliver: dst[ii*kp + p] = bf16(op(A)[i0+ii, p0+p]), zero past kc and past im.
AMX_TARGET void pack_a_amx(float* dst_f, const float* a, bool trans, int64_t lda, int64_t i0, int64_t im, int64_t p0,
                           int64_t kc, int mr) {
  uint16_t* dst = reinterpret_cast<uint16_t*>(dst_f);
  const int64_t kp = (kc + AMX_KB - 1) / AMX_KB * AMX_KB;
  std::memset(dst, 0, size_t(mr * kp) * 2);
  for (int64_t ii = 0; ii < im; ii++) {
    uint16_t* d = dst + ii * kp;
    if (trans) {
      for (int64_t p = 0; p < kc; p++) d[p] = f32_to_bf16(a[(p0 + p) * lda + i0 + ii]);
      continue;
    }
    const float* s = a + (i0 + ii) * lda + p0;
    int64_t p = 0;
    for (; p + 32 <= kc; p += 32) {
      __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + p + 16), _mm512_loadu_ps(s + p));
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(d + p), reinterpret_cast<__m512i&>(h));
    }
    for (; p < kc; p++) d[p] = f32_to_bf16(s[p]);
  }
}

AMX_TARGET void ukr_amx_32x32(int64_t kc, const float* __restrict a_f, const float* __restrict b_f, float* c,
                              int64_t ldc, float alpha, float beta) {
  amx_configure();
  const uint16_t* a = reinterpret_cast<const uint16_t*>(a_f);
  const uint32_t* b = reinterpret_cast<const uint32_t*>(b_f);
  const int64_t kp = (kc + AMX_KB - 1) / AMX_KB * AMX_KB;
  const int64_t a_stride = kp * 2;  // bytes per A row
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k0 = 0; k0 < kp; k0 += AMX_KB) {
    _tile_loadd(4, a + k0, a_stride);
    _tile_loadd(5, a + 16 * kp + k0, a_stride);
    const uint32_t* bk = b + (k0 / 2) * AMX_NR;
    _tile_loadd(6, bk, AMX_NR * 4);
    _tile_loadd(7, bk + 16, AMX_NR * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float acc[AMX_MR * AMX_NR];
  _tile_stored(0, acc, AMX_NR * 4);
  _tile_stored(1, acc + 16, AMX_NR * 4);
  _tile_stored(2, acc + 16 * AMX_NR, AMX_NR * 4);
  _tile_stored(3, acc + 16 * AMX_NR + 16, AMX_NR * 4);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int i = 0; i < AMX_MR; i++) {
    float* ci = c + i * ldc;
    for (int j = 0; j < AMX_NR; j += 16) {
      __m512 r = _mm512_mul_ps(va, _mm512_load_ps(acc + i * AMX_NR + j));
      if (beta != 0.f) r = _mm512_fmadd_ps(vb, _mm512_loadu_ps(ci + j), r);
      _mm512_storeu_ps(ci + j, r);
    }
  }
}

AMX_TARGET double peak_amx(int64_t iters) {
  amx_configure();
  alignas(64) static const uint16_t ones[16 * 32] = {};  // zeros: throughput does not depend on values
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t n = std::max<int64_t>(1, iters / 64);  // one tdpbf16ps does 64× the work of a vdpbf16ps
  for (int64_t t = 0; t < n; t++) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float out[16 * 16];
  _tile_stored(0, out, 64);
  volatile float sink = out[0];
  (void)sink;
  return double(n) * 4 * 16 * 16 * 32 * 2;
}
#endif  // MLORA_X86

// Blocking for AMD Zen 3 (L1d 32 KiB, L2 512 KiB per core, L3 32 MiB shared):
// a B sliver kc×NR = 256×16×4 = 16 KiB stays in L1; an A block mc×kc = 144×256×4 = 144 KiB
// in L2; a B panel kc×nc = 256×4080×4 ≈ 4 MiB in L3.
// AVX-512: B sliver 256×32×4 = 32 KiB, A block 192×256×4 = 192 KiB (on Zen 5, L2 1 MiB, an MC
// of 384 measured the same).
const GemmKernel kScalar{"scalar-4x8", Isa::Scalar, SC_MR,          SC_NR,         128,        256,
                         2048,         ukr_scalar,  pack_a_generic, pack_b_scalar, peak_scalar};
#ifdef MLORA_X86
const GemmKernel kAvx2{"avx2-6x16",    Isa::Avx2,   AVX2_MR,   AVX2_NR, 144,   256, 4080,     ukr_avx2_6x16,
                       pack_a_rows<6>, pack_b_avx2, peak_avx2, nullptr, false, 2,   kRowsAvx2};
const GemmKernel kAvx512{"avx512-12x32",  Isa::Avx512, AVX512_MR,   AVX512_NR, 192,   256, 4096,       ukr_avx512_12x32,
                         pack_a_rows<12>, pack_b_avx2, peak_avx512, nullptr,   false, 2,   kRowsAvx512};
#endif

// bf16 compute. Pairs kernel: kc counts k values, so 512 keeps the B sliver (256 words × 32) at 32 KiB.
const GemmKernel kScalarBf16{
    "scalar-4x8-bf16emu",         Isa::Scalar,   SC_MR,       SC_NR,   128, 256, 2048, ukr_scalar,
    pack_a_round<pack_a_generic>, pack_b_scalar, peak_scalar, nullptr, true};
#ifdef MLORA_X86
const GemmKernel kAvx2Bf16{
    "avx2-6x16-bf16emu",          Isa::Avx2,   AVX2_MR,   AVX2_NR, 144,  256, 4080,     ukr_avx2_6x16,
    pack_a_round<pack_a_rows<6>>, pack_b_avx2, peak_avx2, nullptr, true, 2,   kRowsAvx2};
const GemmKernel kAvx512Bf16Emu{
    "avx512-12x32-bf16emu",       Isa::Avx512, AVX512_MR,   AVX512_NR, 192,  256, 4096,       ukr_avx512_12x32,
    pack_a_round<pack_a_generic>, pack_b_avx2, peak_avx512, nullptr,   true, 2,   kRowsAvx512};
const GemmKernel kAvx512Bf16{
    "avx512bf16-12x32", Isa::Avx512, AVX512_MR,       AVX512_NR,    192,   512, 4096,           ukr_avx512bf16_12x32,
    pack_a_pairs,       pack_b_avx2, peak_avx512bf16, pairs_avx512, false, 2,   kRowsAvx512Bf16};
// AMX: A block 192×512 bf16 = 192 KiB; B sliver 256 pair rows × 32 = 32 KiB.
const GemmKernel kAmxBf16{"amx-bf16-32x32", Isa::Avx512, AMX_MR,      AMX_NR,   192,          512,   4096,
                          ukr_amx_32x32,    pack_a_amx,  pack_b_avx2, peak_amx, pairs_avx512, false, AMX_KB};
#endif

const GemmKernel* choose_kernel() {
  const CpuFeatures& f = cpu_features();
  (void)f;
  const GemmKernel* best = &kScalar;
#ifdef MLORA_X86
  bool has_avx2 = f.avx2 && f.fma && f.f16c;
  bool has_avx512 = has_avx2 && f.avx512f;
  if (has_avx512)
    best = &kAvx512;
  else if (has_avx2)
    best = &kAvx2;
#endif
  const char* env = std::getenv("MLORA_GEMM_KERNEL");
  if (!env || !*env || std::string(env) == "auto") return best;
  std::string want(env);
  if (want == "scalar") return &kScalar;
#ifdef MLORA_X86
  if (want == "avx2" && has_avx2) return &kAvx2;
  if (want == "avx512" && has_avx512) return &kAvx512;
#endif
  std::fprintf(stderr, "mlora: MLORA_GEMM_KERNEL=%s is not available on this CPU; using %s\n", env, best->name);
  return best;
}

// MLORA_GEMM_BLOCKS=mc,kc,nc overrides the cache blocking (a tuning aid for benchmarks; mc and
// nc are rounded to the micro-tile).
const GemmKernel* configure_kernel() {
  const GemmKernel* base = choose_kernel();
  const char* env = std::getenv("MLORA_GEMM_BLOCKS");
  long long mc = 0, kc = 0, nc = 0;
  if (!env || std::sscanf(env, "%lld,%lld,%lld", &mc, &kc, &nc) != 3 || mc < 1 || kc < 1 || nc < 1) return base;
  static GemmKernel tuned;  // written once, here, before any use
  tuned = *base;
  tuned.mc = (mc + base->mr - 1) / base->mr * base->mr;
  tuned.kc = kc;
  tuned.nc = (nc + base->nr - 1) / base->nr * base->nr;
  return &tuned;
}

const GemmKernel& gemm_kernel() {
  static const GemmKernel* k = configure_kernel();  // chosen once, read-only afterwards
  return *k;
}

// The bf16-compute kernel of the instruction set gemm_kernel() runs: vdpbf16ps where the CPU has
// AVX512_BF16 (and the AVX-512 kernel is in use), else that kernel's emulation.
// AMX tiles where the CPU has them and Linux grants them; MLORA_GEMM_BF16_KERNEL=amx|avx512bf16|emu
// forces one (tests run each).
const GemmKernel* choose_bf16_kernel() {
#ifdef MLORA_X86
  const CpuFeatures& f = cpu_features();
  const bool dp = f.avx512bf16 && f.avx512bw;
  const char* env = std::getenv("MLORA_GEMM_BF16_KERNEL");
  const std::string want = env ? env : "";
  switch (gemm_kernel().isa) {
    case Isa::Avx512:
      if (want == "emu") return &kAvx512Bf16Emu;
      if (want == "avx512bf16" && dp) return &kAvx512Bf16;
      if (want != "avx512bf16" && dp && amx_permitted()) return &kAmxBf16;
      return dp ? &kAvx512Bf16 : &kAvx512Bf16Emu;
    case Isa::Avx2: return &kAvx2Bf16;
    default: break;
  }
#endif
  return &kScalarBf16;
}

const GemmKernel& bf16_kernel() {
  static const GemmKernel* k = choose_bf16_kernel();
  return *k;
}

// ---------------------------------------------------------------------------------------
// Scratch owned by the calling thread

struct Scratch {
  float* p = nullptr;
  size_t cap = 0;  // floats
  ~Scratch() { std::free(p); }
  float* get(size_t n) {
    if (n <= cap) return p;
    size_t bytes = (n * sizeof(float) + 4095) & ~size_t(4095);
    void* q = std::aligned_alloc(64, bytes);
    if (!q) throw Error("gemm: cannot allocate " + std::to_string(bytes >> 10) + " KiB of packing scratch");
    std::free(p);
    p = static_cast<float*>(q);
    cap = bytes / sizeof(float);
    return p;
  }
};
thread_local Scratch tls_scratch;

// B words packed by GEMM calls (not by gemm_pack_panels), since the process started: shows
// whether frozen weights' panels are in use (cpu_gemm_packed_b_words).
std::atomic<int64_t> g_packed_b_words{0};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Floats of pack_b_sliver's per-thread tmp for k blocks of up to kc (64-byte multiples).
inline size_t sliver_tmp_floats(const GemmKernel& K, int64_t kc) { return size_t((2 * K.nr * kc + 15) & ~int64_t(15)); }

// Packs a B sliver of a quantized weight: dequantizes while packing. Non-transposed, a row of
// op(B) is a contiguous run of the weight and dequantizes straight into the sliver; transposed,
// the jn weight rows' k runs dequantize into `tmp` (jn×kc, L1/L2-resident) and the kernel's
// f32 packer transposes them from there.
void pack_b_quant(const GemmKernel& K, float* dst, WeightRef b, bool trans, int64_t ldb, int64_t p0, int64_t kc,
                  int64_t j0, int64_t jn, int nr, float* tmp) {
  if (!trans) {
    for (int64_t p = 0; p < kc; p++) {
      float* d = dst + p * nr;
      dequant_run(K.isa, b, (p0 + p) * ldb + j0, jn, d);
      for (int64_t jj = jn; jj < nr; jj++) d[jj] = 0.f;
    }
    return;
  }
  for (int64_t jj = 0; jj < jn; jj++) dequant_run(K.isa, b, (j0 + jj) * ldb + p0, kc, tmp + jj * kc);
  K.pack_b(dst, WeightRef{tmp, DType::F32}, true, kc, 0, kc, 0, jn, nr);
}

// One B sliver in the kernel's format. tmp: 2·nr·kc floats of this thread's scratch.
void pack_b_sliver(const GemmKernel& K, float* dst, WeightRef b, bool trans, int64_t ldb, int64_t p0, int64_t kc,
                   int64_t j0, int64_t jn, int nr, float* tmp) {
  const bool quantized = dtype_quantized(b.dtype);
  const int64_t kw = packed_k(K, kc), kh = (kc + 1) / 2;  // words per column: padded, and holding k values
  if (K.pairs && kw > kh) std::memset(dst + kh * nr, 0, size_t((kw - kh) * nr) * 4);
  if (K.pairs && b.dtype == DType::BF16 && trans && ldb % 2 == 0 && p0 % 2 == 0 && kc % 2 == 0) {
    // a row's (k, k+1) bf16 pair is one 32-bit word of the weight: transpose words as they are
    K.pack_b(dst, WeightRef{b.ptr, DType::F32}, true, ldb / 2, p0 / 2, kc / 2, j0, jn, nr);
    return;
  }
  float* f32 = K.pairs ? tmp + nr * kc : dst;
  if (quantized)
    pack_b_quant(K, f32, b, trans, ldb, p0, kc, j0, jn, nr, tmp);
  else
    K.pack_b(f32, b, trans, ldb, p0, kc, j0, jn, nr);
  if (K.pairs)
    K.pairs(reinterpret_cast<uint32_t*>(dst), f32, kc, nr);
  else if (K.round_b && b.dtype != DType::BF16)
    round_bf16(dst, kc * nr);
}

// The B panel kc×nc at (pc, jc) of op(B), in NR-wide slivers, on all threads (each packs whole
// slivers; tmp: q_floats per thread, pack_b_sliver's).
void pack_b_panel(const GemmKernel& K, ThreadPool& pool, float* dst, WeightRef b, bool trans, int64_t ldb, int64_t pc,
                  int64_t kc, int64_t jc, int64_t nc, float* tmp, size_t q_floats) {
  const int NR = K.nr;
  const int64_t kw = packed_k(K, kc), n_slivers = ceil_div(nc, NR);
  const int64_t pack_grain = std::max<int64_t>(1, 32768 / (kc * NR));
  pool.parallel_for(n_slivers, pack_grain, [&](int64_t s0, int64_t s1, int tid) {
    for (int64_t s = s0; s < s1; s++) {
      const int64_t j = jc + s * NR, jn = std::min<int64_t>(NR, nc - s * NR);
      pack_b_sliver(K, dst + s * NR * kw, b, trans, ldb, pc, kc, j, jn, NR, tmp + q_floats * size_t(tid));
    }
  });
}

// Balanced blocks: k = 1376 runs as 6 blocks of 232 rather than 5×256 + 96 (a short last
// block pays the C tile load/store for little work). Same for mc and nc.
int64_t balanced_block(int64_t total, int64_t cap, int64_t unit) {
  int64_t blocks = ceil_div(total, cap);
  return std::min(ceil_div(ceil_div(total, blocks), unit) * unit, ceil_div(total, unit) * unit);
}
// The K and N blocking depend on the kernel and k, n only (never on m), so B can be packed once.
int64_t kc_block(const GemmKernel& K, int64_t k) { return balanced_block(k, K.kc, std::max(8, K.pairs ? K.kpad : 1)); }
int64_t nc_block(const GemmKernel& K, int64_t n) { return balanced_block(n, K.nc, K.nr); }
const GemmKernel& kernel_for(const WeightRef& b) { return b.bf16_compute ? bf16_kernel() : gemm_kernel(); }

void scale_c(ThreadPool& pool, int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  pool.parallel_for(m, std::max<int64_t>(1, 65536 / n), [&](int64_t r0, int64_t r1, int) {
    for (int64_t i = r0; i < r1; i++) {
      float* ci = c + i * ldc;
      if (beta == 0.f)
        std::fill(ci, ci + n, 0.f);
      else if (beta != 1.f)
        for (int64_t j = 0; j < n; j++) ci[j] *= beta;
    }
  });
}

}  // namespace

const char* cpu_gemm_kernel_name() { return gemm_kernel().name; }
int64_t cpu_gemm_packed_b_words() { return g_packed_b_words.load(std::memory_order_relaxed); }
const char* cpu_gemm_bf16_kernel_name() { return bf16_kernel().name; }
cpu::Isa cpu::gemm_isa() { return gemm_kernel().isa; }

double cpu_fma_peak_gflops(ThreadPool& pool, int64_t iters, bool bf16) {
  const GemmKernel& K = bf16 ? bf16_kernel() : gemm_kernel();
  using clk = std::chrono::steady_clock;
  auto t0 = clk::now();
  std::vector<double> flops(size_t(pool.size()), 0.0);
  pool.run_on_all([&](int tid) { flops[size_t(tid)] = K.peak(iters); });
  double s = std::chrono::duration<double>(clk::now() - t0).count();
  double total = 0;
  for (double f : flops) total += f;
  return total / s * 1e-9;
}

namespace cpu {

namespace {

void gemm_impl(Exec& ex, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, WeightRef b, int64_t ldb, float beta, float* c, int64_t ldc, const GemmEpilogue* ep) {
  if (m <= 0 || n <= 0) return;
  ThreadPool& pool = ex.pool();
  if (k <= 0 || alpha == 0.f) {  // BLAS semantics: A and B are not read
    scale_c(pool, m, n, beta, c, ldc);
    if (ep)  // the epilogue still sees every tile once (tiles of at most kMaxMR × kMaxNR)
      pool.parallel_for(ceil_div(m, kMaxMR), 1, [&](int64_t t0, int64_t t1, int) {
        for (int64_t i = t0 * kMaxMR; i < std::min(m, t1 * kMaxMR); i += kMaxMR)
          for (int64_t j = 0; j < n; j += kMaxNR)
            ep->fn(ep->ctx, i, std::min<int64_t>(kMaxMR, m - i), j, std::min<int64_t>(kMaxNR, n - j), c + i * ldc + j,
                   ldc);
      });
    return;
  }
  const GemmKernel& K = kernel_for(b);
  const int MR = K.mr, NR = K.nr;
  const int T = pool.size();

  const int64_t KCb = kc_block(K, k), NCb = nc_block(K, n), MCb = balanced_block(m, K.mc, MR);
  const int64_t kc_max = std::min(KCb, k);
  const int64_t nc_max = NCb;
  const int64_t mc_max = MCb;
  const int64_t kw_max = std::max(kc_max, packed_k(K, kc_max));  // AMX pads k to 32: may exceed kc
  const float* panels = b.panels;  // packed once (gemm_pack_panels): blocks in the order of the loops below
  const size_t b_floats = panels ? 0 : size_t(kw_max * nc_max);
  const size_t a_floats = size_t((mc_max * kw_max + 15) & ~int64_t(15));  // keep each A block 64-byte aligned
  const bool quantized = dtype_quantized(b.dtype);
  const size_t q_floats = quantized || K.pairs ? sliver_tmp_floats(K, kc_max) : 0;
  float* scratch = tls_scratch.get(b_floats + (a_floats + q_floats) * size_t(T));
  float* bbuf = scratch;
  float* qbuf = scratch + b_floats + a_floats * size_t(T);

  const int64_t m_slivers = ceil_div(m, MR);
  // Split rows when every thread gets at least two MR slivers, else split B's slivers.
  const bool split_m = m_slivers >= 2 * int64_t(T);

  for (int64_t jc = 0; jc < n; jc += NCb) {
    const int64_t nc = std::min(NCb, n - jc);
    const int64_t n_slivers = ceil_div(nc, NR);
    for (int64_t pc = 0; pc < k; pc += KCb) {
      const int64_t kc = std::min(KCb, k - pc);
      const int64_t kw = packed_k(K, kc);  // packed words per row of a sliver
      const float beta_eff = pc == 0 ? beta : 1.f;
      const bool last_k = pc + kc >= k;  // the epilogue runs on tiles that are complete

      // 1. pack the B panel (all threads, shared), unless it was packed once
      const float* bpanel = bbuf;
      if (panels) {
        bpanel = panels;
        panels += n_slivers * NR * kw;
      } else {
        pack_b_panel(K, pool, bbuf, b, trans_b, ldb, pc, kc, jc, nc, qbuf, q_floats);
        g_packed_b_words.fetch_add(n_slivers * NR * kw, std::memory_order_relaxed);
      }

      // 2. compute: rows [r0, r1) × B slivers [s0, s1) on thread tid
      auto block = [&](int64_t r0, int64_t r1, int64_t s0, int64_t s1, int tid) {
        float* abuf = scratch + b_floats + a_floats * size_t(tid);
        alignas(64) float tile[kMaxMR * kMaxNR];
        for (int64_t ic = r0; ic < r1; ic += MCb) {
          const int64_t mc = std::min(MCb, r1 - ic);
          const int64_t mr_slivers = ceil_div(mc, MR);
          for (int64_t t = 0; t < mr_slivers; t++)
            K.pack_a(abuf + t * MR * kw, a, trans_a, lda, ic + t * MR, std::min<int64_t>(MR, mc - t * MR), pc, kc, MR);
          for (int64_t s = s0; s < s1; s++) {
            const float* bs = bpanel + s * NR * kw;
            const int64_t j = jc + s * NR, jn = std::min<int64_t>(NR, nc - s * NR);
            // Panels packed once come from L3 or memory, not from the L2 that a per-call pack has
            // just written: ask for the next sliver (into L2) while this one computes.
            if (panels && s + 1 < s1)
              for (int64_t q = 0; q < NR * kw; q += 16) __builtin_prefetch(bs + NR * kw + q, 0, 2);
            for (int64_t t = 0; t < mr_slivers; t++) {
              const int64_t i = ic + t * MR, in = std::min<int64_t>(MR, mc - t * MR);
              float* cij = c + i * ldc + j;
              if (in == MR && jn == NR) {
                K.ukr(kc, abuf + t * MR * kw, bs, cij, ldc, alpha, beta_eff);
              } else if (jn == NR && K.rows) {  // the bottom edge: only its rows
                K.rows[in](kc, abuf + t * MR * kw, bs, cij, ldc, alpha, beta_eff);
              } else {  // edge tile: full tile into a buffer, then the valid part
                K.ukr(kc, abuf + t * MR * kw, bs, tile, NR, 1.f, 0.f);
                for (int64_t ii = 0; ii < in; ii++) {
                  float* cr = cij + ii * ldc;
                  const float* tr = tile + ii * NR;
                  if (beta_eff == 0.f)
                    for (int64_t jj = 0; jj < jn; jj++) cr[jj] = alpha * tr[jj];
                  else
                    for (int64_t jj = 0; jj < jn; jj++) cr[jj] = alpha * tr[jj] + beta_eff * cr[jj];
                }
              }
              if (ep && last_k) ep->fn(ep->ctx, i, in, j, jn, cij, ldc);
            }
          }
        }
      };
      const double flops_per_sliver = 2.0 * double(kc) * double(MR) * double(nc);
      if (split_m) {
        const int64_t grain = std::max<int64_t>(1, int64_t(2e5 / flops_per_sliver));
        pool.parallel_for(m_slivers, grain, [&](int64_t t0, int64_t t1, int tid) {
          block(t0 * MR, std::min(m, t1 * MR), 0, n_slivers, tid);
        });
      } else {
        const double per_b = 2.0 * double(kc) * double(NR) * double(m);
        const int64_t grain = std::max<int64_t>(1, int64_t(2e5 / per_b));
        pool.parallel_for(n_slivers, grain, [&](int64_t s0, int64_t s1, int tid) { block(0, m, s0, s1, tid); });
      }
    }
  }
}

}  // namespace

void gemm(Exec& ex, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, WeightRef b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl(ex, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr);
}

// A linear's two GEMMs as gemm() sees them: forward X[m,in]·Wᵀ is n = out, k = in, B transposed;
// backward dY[m,out]·W is n = in, k = out, B as stored. Either way ldb = in.
int64_t gemm_panel_floats(bool forward, int64_t out, int64_t in, bool bf16_compute) {
  WeightRef probe;
  probe.bf16_compute = bf16_compute;
  const GemmKernel& K = kernel_for(probe);
  const int64_t n = forward ? out : in, k = forward ? in : out;
  if (n <= 0 || k <= 0) return 0;
  const int64_t KCb = kc_block(K, k), NCb = nc_block(K, n);
  int64_t total = 0;
  for (int64_t jc = 0; jc < n; jc += NCb)
    for (int64_t pc = 0; pc < k; pc += KCb)
      total += ceil_div(std::min(NCb, n - jc), K.nr) * K.nr * packed_k(K, std::min(KCb, k - pc));
  return total;
}

void gemm_pack_panels(Exec& ex, float* dst, WeightRef w, bool forward, int64_t out, int64_t in) {
  w.panels = nullptr;
  const GemmKernel& K = kernel_for(w);
  const int64_t n = forward ? out : in, k = forward ? in : out;
  if (n <= 0 || k <= 0) return;
  const int64_t KCb = kc_block(K, k), NCb = nc_block(K, n);
  const size_t q_floats = sliver_tmp_floats(K, std::min(KCb, k));
  float* tmp = tls_scratch.get(q_floats * size_t(ex.pool().size()));  // 64-byte aligned, as the packers need
  for (int64_t jc = 0; jc < n; jc += NCb) {
    const int64_t nc = std::min(NCb, n - jc);
    for (int64_t pc = 0; pc < k; pc += KCb) {
      const int64_t kc = std::min(KCb, k - pc);
      pack_b_panel(K, ex.pool(), dst, w, forward, in, pc, kc, jc, nc, tmp, q_floats);
      dst += ceil_div(nc, K.nr) * K.nr * packed_k(K, kc);
    }
  }
}

void gemm(Exec& ex, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, WeightRef b, int64_t ldb, float beta, float* c, int64_t ldc, const GemmEpilogue& ep) {
  gemm_impl(ex, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, &ep);
}

}  // namespace cpu
}  // namespace mlora
