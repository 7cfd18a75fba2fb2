// Causal self-attention over a packed batch of variable-length sequences, with grouped-query
// heads (query head h reads kv head h / (hq/hkv)). Flash-style: keys are visited in blocks
// with an online softmax, so nothing of size T×T is ever kept; forward saves only
// lse[h, row] = log Σ_j exp(scale·q·k_j), from which backward recomputes the probabilities.
//
// Accumulation rule: out and lse are written (=). The activation gradients dq, dk, dv are
// written (=): every element is zeroed or overwritten inside this file, never added to what
// the caller left there.
//
// Layout: q, out, dq, dout are [n, hq, d]; k, v, dk, dv are [n, hkv, d]; rows of sequence s
// are cu_seqlens[s] .. cu_seqlens[s+1]-1, and a row attends to rows of its own sequence at or
// before it. Blocks of BQ query rows and BK key rows start at each sequence's first row, so
// without a window only the diagonal block needs a causal mask.
//
// Sliding window (Mistral; window = W > 0): query i of a sequence sees keys j with
// i - W < j <= i (W keys including itself), transformers' sliding-window mask. Key tiles wholly
// outside every row's window are skipped (tile_visible); the tiles at the window's lower edge
// mask per row. window = 0: plain causal attention, bit for bit the same as without a window.
//
// Threads: forward work items are (sequence, query head, query block). Backward items are
// (sequence, kv head): one item owns its dk/dv rows and the dq rows of its query-head group,
// so no two threads ever write the same element. When there are too few such items to keep
// the pool busy, backward runs in two race-free passes instead: (sequence, kv head, key block)
// items write dk/dv, then (sequence, query head, query block) items write dq. Both schedules
// add the same terms in the same order, so results are bitwise independent of thread count.
//
// Speed: the inner products (S = q·Kᵀ, dP = do·Vᵀ against a transposed, packed key block) and
// the row updates (o += p·V, dq += dS·K, dk += dSᵀ·q, dv += Pᵀ·do) are small register-blocked
// kernels: an AVX2+FMA version chosen at run time (cpu_features) and a portable one.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../kernels.h"
#include "cpu_features.h"
#include "vmath.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MLORA_ATTN_X86 1
#endif

namespace mlora::cpu {

namespace {

constexpr int64_t BQ = 64;  // query rows per block
constexpr int64_t BK = 64;  // key rows per block (BQ == BK: only diagonal blocks are masked)

// ---- micro-kernels. rowdot: s[j] = scale·Σ_c a[c]·bt[c·BK + j] for j < BK (bt: a packed,
// transposed key block, zero-padded). axpy_rows: o[c] += Σ_r coef[r·cs]·rows[r·stride + c].

struct Portable {
  static inline void rowdot(float* __restrict s, const float* __restrict a, const float* __restrict bt, int64_t d,
                            float scale) {
    float acc[BK];
#pragma omp simd
    for (int64_t j = 0; j < BK; j++) acc[j] = 0.f;
    for (int64_t c = 0; c < d; c++) {
      const float ac = a[c];
      const float* b = bt + c * BK;
#pragma omp simd
      for (int64_t j = 0; j < BK; j++) acc[j] += ac * b[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < BK; j++) s[j] = acc[j] * scale;
  }
  static inline void axpy_rows(float* __restrict o, const float* coef, int64_t cs, const float* rows, int64_t stride,
                               int64_t cnt, int64_t d) {
    for (int64_t r = 0; r < cnt; r++) {
      const float cr = coef[r * cs];
      const float* x = rows + r * stride;
#pragma omp simd
      for (int64_t c = 0; c < d; c++) o[c] += cr * x[c];
    }
  }
};

#ifdef MLORA_ATTN_X86
#define MLORA_AVX2 __attribute__((target("avx2,fma")))

template <int NR>
MLORA_AVX2 inline void axpy_rows_avx2(float* o, const float* coef, int64_t cs, const float* rows, int64_t stride,
                                      int64_t cnt) {
  __m256 acc[NR], acc2[NR];
#pragma GCC unroll 8
  for (int k = 0; k < NR; k++) acc[k] = _mm256_loadu_ps(o + 8 * k), acc2[k] = _mm256_setzero_ps();
  int64_t r = 0;
  if (NR <= 4) {  // short rows: two independent chains hide the FMA latency
    for (; r + 1 < cnt; r += 2) {
      __m256 b0 = _mm256_broadcast_ss(coef + r * cs), b1 = _mm256_broadcast_ss(coef + (r + 1) * cs);
      const float* x0 = rows + r * stride;
      const float* x1 = x0 + stride;
#pragma GCC unroll 8
      for (int k = 0; k < NR; k++) {
        acc[k] = _mm256_fmadd_ps(b0, _mm256_loadu_ps(x0 + 8 * k), acc[k]);
        acc2[k] = _mm256_fmadd_ps(b1, _mm256_loadu_ps(x1 + 8 * k), acc2[k]);
      }
    }
  }
  for (; r < cnt; r++) {
    __m256 b = _mm256_broadcast_ss(coef + r * cs);
    const float* x = rows + r * stride;
#pragma GCC unroll 8
    for (int k = 0; k < NR; k++) acc[k] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + 8 * k), acc[k]);
  }
#pragma GCC unroll 8
  for (int k = 0; k < NR; k++) _mm256_storeu_ps(o + 8 * k, NR <= 4 ? _mm256_add_ps(acc[k], acc2[k]) : acc[k]);
}

struct Avx2 {
  static MLORA_AVX2 inline void rowdot(float* s, const float* a, const float* bt, int64_t d, float scale) {
    static_assert(BK == 64, "rowdot_avx2 holds one 64-wide row of scores in 8 registers");
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t c = 0; c < d; c++) {
      __m256 x = _mm256_broadcast_ss(a + c);
      const float* b = bt + c * BK;
      a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 0), a0);
      a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 8), a1);
      a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 16), a2);
      a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 24), a3);
      a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 32), a4);
      a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 40), a5);
      a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 48), a6);
      a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 56), a7);
    }
    __m256 sc = _mm256_set1_ps(scale);
    _mm256_storeu_ps(s + 0, _mm256_mul_ps(a0, sc));
    _mm256_storeu_ps(s + 8, _mm256_mul_ps(a1, sc));
    _mm256_storeu_ps(s + 16, _mm256_mul_ps(a2, sc));
    _mm256_storeu_ps(s + 24, _mm256_mul_ps(a3, sc));
    _mm256_storeu_ps(s + 32, _mm256_mul_ps(a4, sc));
    _mm256_storeu_ps(s + 40, _mm256_mul_ps(a5, sc));
    _mm256_storeu_ps(s + 48, _mm256_mul_ps(a6, sc));
    _mm256_storeu_ps(s + 56, _mm256_mul_ps(a7, sc));
  }
  // Chunks of 64 columns (8 registers); a head dim that is not a multiple of 8 uses the
  // portable loop.
  static MLORA_AVX2 inline void axpy_rows(float* o, const float* coef, int64_t cs, const float* rows, int64_t stride,
                                          int64_t cnt, int64_t d) {
    if (d % 8 != 0) return Portable::axpy_rows(o, coef, cs, rows, stride, cnt, d);
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
      switch (std::min<int64_t>(64, d - c0) / 8) {
        case 1: axpy_rows_avx2<1>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        case 2: axpy_rows_avx2<2>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        case 3: axpy_rows_avx2<3>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        case 4: axpy_rows_avx2<4>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        case 5: axpy_rows_avx2<5>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        case 6: axpy_rows_avx2<6>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        case 7: axpy_rows_avx2<7>(o + c0, coef, cs, rows + c0, stride, cnt); break;
        default: axpy_rows_avx2<8>(o + c0, coef, cs, rows + c0, stride, cnt); break;
      }
    }
  }
};
#endif

// Everything one call shares: pointers, sizes and row strides.
struct Problem {
  const float *q, *k, *v, *out, *dout, *lse;
  float *o, *lse_out, *dq, *dk, *dv;
  const int32_t* cu;
  int64_t n, hq, hkv, d, group, qs, ks;  // qs = hq·d, ks = hkv·d: row strides
  float scale;
  int64_t window;  // 0: none
};

// Does any query row of [i0, i0+nq) see any key of [j0, j0+nb)? (positions within one sequence)
inline bool tile_visible(const Problem& P, int64_t i0, int64_t nq, int64_t j0, int64_t nb) {
  if (j0 > i0 + nq - 1) return false;                      // causal: keys after every query
  return P.window <= 0 || j0 + nb - 1 > i0 - P.window;   // window: keys older than every row's window
}

// First key (relative to j0) query row i sees; keys before it are outside its window.
inline int64_t first_visible(const Problem& P, int64_t i, int64_t j0) {
  return P.window <= 0 ? 0 : std::max<int64_t>(0, i - P.window + 1 - j0);
}

// Per-thread scratch, sized once per call.
struct Scratch {
  std::vector<float> kt, vt, o, m, l, s, p, dp, ptile, dstile, dacc_k, dacc_v, delta;
  explicit Scratch(int64_t d)
      : kt(size_t(d * BK)), vt(size_t(d * BK)), o(size_t(BQ * d)), m(BQ), l(BQ), s(BK), p(BK), dp(BK),
        ptile(size_t(BQ * BK)), dstile(size_t(BQ * BK)), dacc_k(size_t(BK * d)), dacc_v(size_t(BK * d)),
        delta(BQ) {}
};

// bt[c·BK + jj] = x[row j0+jj][c] for jj < nb, zero-padded to BK columns.
inline void pack_transposed(float* bt, const float* x, int64_t stride, int64_t nb, int64_t d) {
  for (int64_t c = 0; c < d; c++) {
    float* dst = bt + c * BK;
    for (int64_t jj = 0; jj < nb; jj++) dst[jj] = x[jj * stride + c];
    for (int64_t jj = nb; jj < BK; jj++) dst[jj] = 0.f;
  }
}

// ---- forward: one (sequence rows [r0, r0+T), query head h, query block ib) item.
template <class K>
__attribute__((always_inline)) inline void forward_item(const Problem& P, Scratch& w, int64_t r0, int64_t T,
                                                        int64_t h, int64_t ib) {
  const int64_t d = P.d, kvh = h / P.group;
  const int64_t i0 = ib * BQ, nq = std::min(BQ, T - i0);
  float* o = w.o.data();
  float *m = w.m.data(), *l = w.l.data(), *s = w.s.data(), *p = w.p.data();
  std::fill(o, o + nq * d, 0.f);
  for (int64_t ii = 0; ii < nq; ii++) m[ii] = -std::numeric_limits<float>::infinity(), l[ii] = 0.f;
  for (int64_t jb = 0; jb <= ib; jb++) {
    const int64_t j0 = jb * BK, nb = std::min(BK, T - j0);
    if (!tile_visible(P, i0, nq, j0, nb)) continue;
    const float* krows = P.k + (r0 + j0) * P.ks + kvh * d;
    const float* vrows = P.v + (r0 + j0) * P.ks + kvh * d;
    pack_transposed(w.kt.data(), krows, P.ks, nb, d);
    for (int64_t ii = 0; ii < nq; ii++) {
      const int64_t i = i0 + ii;
      const int64_t nv = std::min(nb, i - j0 + 1);  // causal: keys j0 .. i
      const int64_t jlo = first_visible(P, i, j0);  // window: keys j0 + jlo ..
      if (jlo >= nv) continue;                      // this row sees none of the tile
      const float* qi = P.q + (r0 + i) * P.qs + h * d;
      K::rowdot(s, qi, w.kt.data(), d, P.scale);
      float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t j = jlo; j < nv; j++) mx = std::max(mx, s[j]);
      const float mnew = std::max(m[ii], mx);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < BK; j++) {
        float e = j >= jlo && j < nv ? exp_approx(s[j] - mnew) : 0.f;
        p[j] = e;
        sum += e;
      }
      float* oi = o + ii * d;
      if (m[ii] != mnew) {
        const float corr = std::exp(m[ii] - mnew);  // 0 on the first block (m = −inf)
        l[ii] *= corr;
#pragma omp simd
        for (int64_t c = 0; c < d; c++) oi[c] *= corr;
      }
      l[ii] += sum;
      m[ii] = mnew;
      K::axpy_rows(oi, p + jlo, 1, vrows + jlo * P.ks, P.ks, nv - jlo, d);
    }
  }
  for (int64_t ii = 0; ii < nq; ii++) {
    const int64_t row = r0 + i0 + ii;
    const float inv = 1.f / l[ii];
    float* dst = P.o + row * P.qs + h * d;
    const float* oi = o + ii * d;
#pragma omp simd
    for (int64_t c = 0; c < d; c++) dst[c] = oi[c] * inv;
    P.lse_out[h * P.n + row] = m[ii] + std::log(l[ii]);
  }
}

// ---- backward: the tile (query head h, query block ib) × (key block jb) of one sequence.
// Expects w.kt / w.vt to hold the packed key block. Adds this tile's terms to dq (rows of ib,
// when want_dq) and to the key block's dk/dv accumulators w.dacc_k / w.dacc_v (when want_dkv).
template <class K>
__attribute__((always_inline)) inline void backward_tile(const Problem& P, Scratch& w, int64_t r0, int64_t T,
                                                         int64_t h, int64_t ib, int64_t jb, bool want_dq,
                                                         bool want_dkv) {
  const int64_t d = P.d, kvh = h / P.group;
  const int64_t i0 = ib * BQ, nq = std::min(BQ, T - i0);
  const int64_t j0 = jb * BK, nb = std::min(BK, T - j0);
  const float* krows = P.k + (r0 + j0) * P.ks + kvh * d;
  float *s = w.s.data(), *dp = w.dp.data(), *delta = w.delta.data();
  // D_i = rowsum(dout ∘ out)
  for (int64_t ii = 0; ii < nq; ii++) {
    const float* doi = P.dout + (r0 + i0 + ii) * P.qs + h * d;
    const float* oi = P.out + (r0 + i0 + ii) * P.qs + h * d;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < d; c++) acc += doi[c] * oi[c];
    delta[ii] = acc;
  }
  for (int64_t ii = 0; ii < nq; ii++) {
    const int64_t i = i0 + ii, row = r0 + i;
    const int64_t nv = std::min(nb, i - j0 + 1);
    const int64_t jlo = std::min(first_visible(P, i, j0), nv);  // a row outside the window: all p = 0
    const float* qi = P.q + row * P.qs + h * d;
    const float* doi = P.dout + row * P.qs + h * d;
    const float L = P.lse[h * P.n + row];
    K::rowdot(s, qi, w.kt.data(), d, P.scale);
    K::rowdot(dp, doi, w.vt.data(), d, 1.f);
    float* pt = w.ptile.data() + ii * BK;
    float* dst = w.dstile.data() + ii * BK;
    const float di = delta[ii], sc = P.scale;
#pragma omp simd
    for (int64_t j = 0; j < BK; j++) {
      float pj = j >= jlo && j < nv ? exp_approx(s[j] - L) : 0.f;
      pt[j] = pj;
      dst[j] = sc * pj * (dp[j] - di);  // scale·dS: the factor dq and dk both need
    }
    if (want_dq) K::axpy_rows(P.dq + row * P.qs + h * d, dst + jlo, 1, krows + jlo * P.ks, P.ks, nv - jlo, d);
  }
  if (want_dkv) {
    const float* qrows = P.q + (r0 + i0) * P.qs + h * d;
    const float* dorows = P.dout + (r0 + i0) * P.qs + h * d;
    for (int64_t jj = 0; jj < nb; jj++) {
      K::axpy_rows(w.dacc_k.data() + jj * d, w.dstile.data() + jj, BK, qrows, P.qs, nq, d);
      K::axpy_rows(w.dacc_v.data() + jj * d, w.ptile.data() + jj, BK, dorows, P.qs, nq, d);
    }
  }
}

template <class K>
__attribute__((always_inline)) inline void pack_kv(const Problem& P, Scratch& w, int64_t r0, int64_t T,
                                                   int64_t kvh, int64_t jb) {
  const int64_t j0 = jb * BK, nb = std::min(BK, T - j0);
  pack_transposed(w.kt.data(), P.k + (r0 + j0) * P.ks + kvh * P.d, P.ks, nb, P.d);
  pack_transposed(w.vt.data(), P.v + (r0 + j0) * P.ks + kvh * P.d, P.ks, nb, P.d);
}

// dk/dv of key block jb of kv head kvh: the sum over the group's query heads and the query
// blocks at or after jb. With want_dq, also adds those tiles' terms to dq (the caller zeroed it).
template <class K>
__attribute__((always_inline)) inline void backward_kv_block(const Problem& P, Scratch& w, int64_t r0, int64_t T,
                                                             int64_t kvh, int64_t jb, bool want_dq) {
  const int64_t d = P.d, nblk = (T + BQ - 1) / BQ;
  const int64_t j0 = jb * BK, nb = std::min(BK, T - j0);
  pack_kv<K>(P, w, r0, T, kvh, jb);
  std::fill(w.dacc_k.begin(), w.dacc_k.begin() + nb * d, 0.f);
  std::fill(w.dacc_v.begin(), w.dacc_v.begin() + nb * d, 0.f);
  for (int64_t hh = 0; hh < P.group; hh++)
    for (int64_t ib = jb; ib < nblk; ib++)
      if (tile_visible(P, ib * BQ, std::min(BQ, T - ib * BQ), j0, nb))
        backward_tile<K>(P, w, r0, T, kvh * P.group + hh, ib, jb, want_dq, true);
  for (int64_t jj = 0; jj < nb; jj++) {
    std::memcpy(P.dk + (r0 + j0 + jj) * P.ks + kvh * d, w.dacc_k.data() + jj * d, size_t(d) * sizeof(float));
    std::memcpy(P.dv + (r0 + j0 + jj) * P.ks + kvh * d, w.dacc_v.data() + jj * d, size_t(d) * sizeof(float));
  }
}

inline void zero_rows(float* base, int64_t stride, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; r++) std::fill(base + r * stride, base + r * stride + d, 0.f);
}

// One whole (sequence, kv head): dk, dv and the group's dq.
template <class K>
__attribute__((always_inline)) inline void backward_seq_kv(const Problem& P, Scratch& w, int64_t r0, int64_t T,
                                                           int64_t kvh) {
  for (int64_t hh = 0; hh < P.group; hh++) zero_rows(P.dq + r0 * P.qs + (kvh * P.group + hh) * P.d, P.qs, T, P.d);
  const int64_t nblk = (T + BK - 1) / BK;
  for (int64_t jb = 0; jb < nblk; jb++) backward_kv_block<K>(P, w, r0, T, kvh, jb, true);
}

// dq of one (sequence, query head, query block): the sum over key blocks 0 .. ib.
template <class K>
__attribute__((always_inline)) inline void backward_dq_block(const Problem& P, Scratch& w, int64_t r0, int64_t T,
                                                             int64_t h, int64_t ib) {
  const int64_t i0 = ib * BQ, nq = std::min(BQ, T - i0);
  zero_rows(P.dq + (r0 + i0) * P.qs + h * P.d, P.qs, nq, P.d);
  for (int64_t jb = 0; jb <= ib; jb++) {
    if (!tile_visible(P, i0, nq, jb * BK, std::min(BK, T - jb * BK))) continue;
    pack_kv<K>(P, w, r0, T, h / P.group, jb);
    backward_tile<K>(P, w, r0, T, h, ib, jb, true, false);
  }
}

// The entry points each instruction set gets compiled for.
struct Kernels {
  void (*forward)(const Problem&, Scratch&, int64_t, int64_t, int64_t, int64_t);
  void (*seq_kv)(const Problem&, Scratch&, int64_t, int64_t, int64_t);
  void (*kv_block)(const Problem&, Scratch&, int64_t, int64_t, int64_t, int64_t, bool);
  void (*dq_block)(const Problem&, Scratch&, int64_t, int64_t, int64_t, int64_t);
};

void fwd_portable(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t h, int64_t ib) {
  forward_item<Portable>(P, w, r0, T, h, ib);
}
void seq_kv_portable(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t kvh) {
  backward_seq_kv<Portable>(P, w, r0, T, kvh);
}
void kv_block_portable(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t kvh, int64_t jb, bool dq) {
  backward_kv_block<Portable>(P, w, r0, T, kvh, jb, dq);
}
void dq_block_portable(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t h, int64_t ib) {
  backward_dq_block<Portable>(P, w, r0, T, h, ib);
}

#ifdef MLORA_ATTN_X86
MLORA_AVX2 void fwd_avx2(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t h, int64_t ib) {
  forward_item<Avx2>(P, w, r0, T, h, ib);
}
MLORA_AVX2 void seq_kv_avx2(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t kvh) {
  backward_seq_kv<Avx2>(P, w, r0, T, kvh);
}
MLORA_AVX2 void kv_block_avx2(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t kvh, int64_t jb, bool dq) {
  backward_kv_block<Avx2>(P, w, r0, T, kvh, jb, dq);
}
MLORA_AVX2 void dq_block_avx2(const Problem& P, Scratch& w, int64_t r0, int64_t T, int64_t h, int64_t ib) {
  backward_dq_block<Avx2>(P, w, r0, T, h, ib);
}
#endif

// MLORA_CPU_PORTABLE=1 in the environment forces the portable loops (tests use it to check
// the fallback path on machines that have AVX2).
Kernels pick_kernels() {
#ifdef MLORA_ATTN_X86
  const CpuFeatures& f = cpu_features();
  const char* portable = std::getenv("MLORA_CPU_PORTABLE");
  if (f.avx2 && f.fma && !(portable && portable[0] == '1')) return {fwd_avx2, seq_kv_avx2, kv_block_avx2, dq_block_avx2};
#endif
  return {fwd_portable, seq_kv_portable, kv_block_portable, dq_block_portable};
}

// Runs on the calling thread before any worker starts, so the Error reaches JavaScript.
void check_cu_seqlens(const int32_t* cu, int64_t nseq, int64_t n) {
  if (cu[0] != 0)
    throw Error("argument 'cuSeqlens' must start at 0, got cuSeqlens[0] = " + std::to_string(cu[0]));
  for (int64_t s = 0; s < nseq; s++)
    if (cu[s + 1] < cu[s])
      throw Error("argument 'cuSeqlens' must be non-decreasing, got cuSeqlens[" + std::to_string(s + 1) +
                  "] = " + std::to_string(cu[s + 1]) + " < cuSeqlens[" + std::to_string(s) +
                  "] = " + std::to_string(cu[s]));
  if (cu[nseq] != n)
    throw Error("argument 'cuSeqlens' must end at n = " + std::to_string(n) + " (the rows of q), got " +
                std::to_string(cu[nseq]));
}

struct Item {
  int64_t seq, head, block, cost;
};

std::vector<Scratch> make_scratch(Exec& ex, int64_t d) {
  std::vector<Scratch> w;
  w.reserve(size_t(ex.pool().size()));
  for (int t = 0; t < ex.pool().size(); t++) w.emplace_back(d);
  return w;
}

// Heaviest first, so the dynamic schedule ends with small items.
void sort_items(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
}

}  // namespace

void attention_forward(Exec& ex, float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* cu_seqlens, int64_t nseq, int64_t n, int64_t hq, int64_t hkv, int64_t d,
                       float scale, int64_t window) {
  check_cu_seqlens(cu_seqlens, nseq, n);
  if (n == 0 || d == 0) return;
  Problem P{q, k, v, nullptr, nullptr, nullptr, out, lse, nullptr, nullptr, nullptr, cu_seqlens,
            n, hq, hkv, d, hq / hkv, hq * d, hkv * d, scale, window};
  std::vector<Item> items;
  for (int64_t s = 0; s < nseq; s++) {
    const int64_t T = cu_seqlens[s + 1] - cu_seqlens[s];
    for (int64_t h = 0; h < hq; h++)
      for (int64_t ib = 0; ib * BQ < T; ib++) items.push_back({s, h, ib, (ib + 1) * std::min(BQ, T - ib * BQ)});
  }
  sort_items(items);
  std::vector<Scratch> scratch = make_scratch(ex, d);
  const Kernels kern = pick_kernels();
  ex.pool().parallel_dynamic(int64_t(items.size()), [&](int64_t it, int tid) {
    const Item& x = items[size_t(it)];
    const int64_t r0 = cu_seqlens[x.seq], T = cu_seqlens[x.seq + 1] - r0;
    kern.forward(P, scratch[size_t(tid)], r0, T, x.head, x.block);
  });
}

void attention_backward(Exec& ex, float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* cu_seqlens, int64_t nseq,
                        int64_t n, int64_t hq, int64_t hkv, int64_t d, float scale, int64_t window) {
  check_cu_seqlens(cu_seqlens, nseq, n);
  if (n == 0 || d == 0) return;
  Problem P{q, k, v, out, dout, lse, nullptr, nullptr, dq, dk, dv, cu_seqlens,
            n, hq, hkv, d, hq / hkv, hq * d, hkv * d, scale, window};
  std::vector<Scratch> scratch = make_scratch(ex, d);
  const Kernels kern = pick_kernels();
  const int threads = ex.pool().size();
  int64_t busy = 0;  // (sequence, kv head) items with any rows
  for (int64_t s = 0; s < nseq; s++) busy += cu_seqlens[s + 1] > cu_seqlens[s] ? hkv : 0;

  if (threads == 1 || busy >= 4 * int64_t(threads)) {
    std::vector<Item> items;
    for (int64_t s = 0; s < nseq; s++) {
      const int64_t T = cu_seqlens[s + 1] - cu_seqlens[s];
      if (T > 0)
        for (int64_t g = 0; g < hkv; g++) items.push_back({s, g, 0, T * T});
    }
    sort_items(items);
    ex.pool().parallel_dynamic(int64_t(items.size()), [&](int64_t it, int tid) {
      const Item& x = items[size_t(it)];
      const int64_t r0 = cu_seqlens[x.seq], T = cu_seqlens[x.seq + 1] - r0;
      kern.seq_kv(P, scratch[size_t(tid)], r0, T, x.head);
    });
    return;
  }
  // Few, long sequences: dk/dv per key block, then dq per query block.
  std::vector<Item> kv_items, q_items;
  for (int64_t s = 0; s < nseq; s++) {
    const int64_t T = cu_seqlens[s + 1] - cu_seqlens[s];
    const int64_t nblk = (T + BQ - 1) / BQ;
    for (int64_t b = 0; b < nblk; b++) {
      for (int64_t g = 0; g < hkv; g++) kv_items.push_back({s, g, b, nblk - b});
      for (int64_t h = 0; h < hq; h++) q_items.push_back({s, h, b, b + 1});
    }
  }
  sort_items(kv_items);
  sort_items(q_items);
  ex.pool().parallel_dynamic(int64_t(kv_items.size()), [&](int64_t it, int tid) {
    const Item& x = kv_items[size_t(it)];
    const int64_t r0 = cu_seqlens[x.seq], T = cu_seqlens[x.seq + 1] - r0;
    kern.kv_block(P, scratch[size_t(tid)], r0, T, x.head, x.block, false);
  });
  ex.pool().parallel_dynamic(int64_t(q_items.size()), [&](int64_t it, int tid) {
    const Item& x = q_items[size_t(it)];
    const int64_t r0 = cu_seqlens[x.seq], T = cu_seqlens[x.seq + 1] - r0;
    kern.dq_block(P, scratch[size_t(tid)], r0, T, x.head, x.block);
  });
}

}  // namespace mlora::cpu
