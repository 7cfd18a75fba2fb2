// Causal self-attention over a packed batch of variable-length sequences, with grouped-query
// heads (query head h reads kv head h / (hq/hkv)). Flash-style: keys are visited in tiles
// with an online softmax, so nothing of size T×T is ever kept; forward saves only
// lse[h, row] = log Σ_j exp(scale·q·k_j), from which backward recomputes the probabilities.
//
// Accumulation rule: out and lse are written (=). The activation gradients dq, dk, dv are
// written (=): every element is zeroed or overwritten inside this file, never added to what
// the caller left there.
//
// Layout: q, out, dq, dout are [n, hq, d]; k, v, dk, dv are [n, hkv, d]; rows of sequence s
// are cu_seqlens[s] .. cu_seqlens[s+1]-1, and a row attends to rows of its own sequence at or
// before it. Tiles of B query rows and B key rows start at each sequence's first row, so
// without a window only the diagonal tile needs a causal mask, and tiles above it are never
// visited.
//
// Sliding window (window = W > 0): query i of a sequence sees keys j with i - W < j <= i.
// Key tiles wholly outside every row's window are skipped (tile_visible); the tiles at the
// window's lower edge mask per row. window = 0: plain causal attention.
//
// Speed: every product of a tile (S = Q·Kᵀ, O = diag(r)·O + P·V; backward S, dP = dO·Vᵀ,
// dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K) is a small GEMM on register-blocked micro-tiles, the
// tile's scores and probabilities stay in a B×B scratch in L1, and a key tile is packed
// (transposed) once and used by all query heads of its GQA group. The tile code lives in
// attention_tiles.inc and is compiled three times: AVX-512 (8×32 micro-tile), AVX2+FMA (6×16)
// and portable (4×4), picked per call from cpu_features and the head dim (the vector paths
// need d to be a multiple of their width). MLORA_GEMM_KERNEL=scalar|avx2|avx512 forces one,
// as for the GEMM (tests run every path this CPU has).
//
// Threads: forward work items are (sequence, kv head, query tile). Backward items are
// (sequence, kv head): one item owns its dk/dv rows and the dq rows of its query-head group,
// so no two threads ever write the same element. When there are too few such items to keep
// the pool busy, backward runs in two race-free passes instead: (sequence, kv head, key tile)
// items write dk/dv, then (sequence, query head, query tile) items write dq. Both schedules
// add the same terms in the same order, so results are bitwise independent of thread count.
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

constexpr int64_t B = 64;  // query rows and key rows per tile (equal: only diagonal tiles are masked)

// Everything one call shares: pointers, sizes and row strides.
struct Problem {
  const float *q, *k, *v, *out, *dout, *lse, *delta;
  float *o, *lse_out, *dq, *dk, *dv;
  const int32_t* cu;
  int64_t n, hq, hkv, d, group, qs, ks;  // qs = hq·d, ks = hkv·d: row strides
  float scale;
  int64_t window;  // 0: none
};

// Per-thread scratch, sized once per call: packed key/value tiles (d×B, transposed), the
// tile's scores and their gradient (B×B), and the forward's output accumulators and running
// max/sum of every query head of the group.
struct Scratch {
  std::vector<float> qt, kt, vt, s, dp, o, m, l, rs;
  Scratch(int64_t d, int64_t group, bool forward)
      : qt(forward ? size_t(group * d * B) : 0), kt(forward ? 0 : size_t(d * B)), vt(forward ? 0 : size_t(d * B)),
        s(size_t(B * B)), dp(forward ? 0 : size_t(B * B)), o(forward ? size_t(group * B * d) : 0),
        m(forward ? size_t(group * B) : 0), l(forward ? size_t(group * B) : 0), rs(size_t(B)) {}
};

// Does any query row of [i0, i0+nq) see any key of [j0, j0+nb)? (positions within one sequence)
inline bool tile_visible(const Problem& P, int64_t i0, int64_t nq, int64_t j0, int64_t nb) {
  if (j0 > i0 + nq - 1) return false;                    // causal: keys after every query
  return P.window <= 0 || j0 + nb - 1 > i0 - P.window;  // window: keys older than every row's window
}

// The keys j0+lo .. j0+hi-1 of a tile that query row i sees (lo >= hi: none).
inline void visible_keys(const Problem& P, int64_t i, int64_t j0, int64_t nb, int64_t& lo, int64_t& hi) {
  hi = std::min(nb, i - j0 + 1);
  lo = P.window <= 0 ? 0 : std::max<int64_t>(0, i - P.window + 1 - j0);
}

// The first key tile that the query tile starting at i0 sees (its diagonal tile at the latest).
inline int64_t first_key_tile(const Problem& P, int64_t i0) {
  if (P.window <= 0) return 0;
  const int64_t oldest = std::max<int64_t>(0, i0 - P.window + 1);  // the oldest key row i0 sees
  return oldest / B;
}

// The queries i0+lo .. i0+hi-1 of a tile (hi <= B) that see key j.
inline void visible_queries(const Problem& P, int64_t j, int64_t i0, int64_t& lo, int64_t& hi) {
  lo = std::clamp<int64_t>(j - i0, 0, B);
  hi = P.window <= 0 ? B : std::clamp<int64_t>(j + P.window - i0, 0, B);
}

// row[c] = value for the tile columns c outside [lo, hi) (all of them when lo >= hi).
inline void mask_outside(float* row, int64_t lo, int64_t hi, float value) {
  std::fill(row, row + lo, value);
  std::fill(row + std::max(lo, hi), row + B, value);
}

// bt[c·B + jj] = x[row jj][c] for jj < nb, zero-padded to B columns.
inline void pack_transposed_scalar(float* bt, const float* x, int64_t stride, int64_t j0, int64_t nb, int64_t d) {
  for (int64_t jj = j0; jj < nb; jj++) {
    const float* src = x + jj * stride;
    for (int64_t c = 0; c < d; c++) bt[c * B + jj] = src[c];
  }
  if (nb < B)
    for (int64_t c = 0; c < d; c++) std::fill(bt + c * B + nb, bt + (c + 1) * B, 0.f);
}

inline void zero_rows(float* base, int64_t stride, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; r++) std::fill(base + r * stride, base + r * stride + d, 0.f);
}

// The entry points each instruction set gets compiled for.
struct Kernels {
  void (*forward)(const Problem&, Scratch&, int64_t r0, int64_t T, int64_t kvh, int64_t ib);
  void (*seq_kv)(const Problem&, Scratch&, int64_t r0, int64_t T, int64_t kvh);
  void (*kv_block)(const Problem&, Scratch&, int64_t r0, int64_t T, int64_t kvh, int64_t jb, bool want_dq);
  void (*dq_block)(const Problem&, Scratch&, int64_t r0, int64_t T, int64_t h, int64_t ib);
};

// ---- portable: plain floats, 4×4 micro-tiles (the compiler may still vectorise).
namespace portable {
#define TT
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
  static void pack_transposed(float* bt, const float* x, int64_t stride, int64_t nb, int64_t d) {
    pack_transposed_scalar(bt, x, stride, 0, nb, d);
  }
};
constexpr int MR = 4, NV = 4;
#include "attention_tiles.inc"
#undef TT
}  // namespace portable

#ifdef MLORA_ATTN_X86
// ---- AVX2 + FMA: 6×16 micro-tiles (12 of the 16 ymm registers accumulate).
namespace avx2 {
#define TT __attribute__((target("avx2,fma")))
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
    const T n = _mm256_round_ps(_mm256_mul_ps(xc, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
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
  static TT void pack_transposed(float* bt, const float* x, int64_t stride, int64_t nb, int64_t d) {
    int64_t jj = 0;
    for (; jj + 8 <= nb; jj += 8)
      for (int64_t c = 0; c < d; c += 8) {
        T r[8];
        for (int i = 0; i < 8; i++) r[i] = load(x + (jj + i) * stride + c);
        transpose8(r);
        for (int i = 0; i < 8; i++) store(bt + (c + i) * B + jj, r[i]);
      }
    pack_transposed_scalar(bt, x, stride, jj, nb, d);
  }
  static TT void transpose8(T* r) {
    const T t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const T t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const T t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const T t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const T u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const T u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const T u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const T u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
  }
};
constexpr int MR = 6, NV = 2;
#include "attention_tiles.inc"
#undef TT
}  // namespace avx2

// ---- AVX-512F: 8×32 micro-tiles (16 zmm accumulators).
// GCC 12's avx512fintrin.h builds several intrinsics (max, min, shifts, conversions) on
// _mm512_undefined_ps, which its own -Wmaybe-uninitialized then reports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512 {
#define TT __attribute__((target("avx512f,avx2,fma")))
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
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(xc, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
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
    return _mm512_maskz_mov_ps(__mmask16(~_mm512_cmp_ps_mask(x, set1(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ)), x);
  }
  static TT void pack_transposed(float* bt, const float* x, int64_t stride, int64_t nb, int64_t d) {
    avx2::V::pack_transposed(bt, x, stride, nb, d);
  }
};
constexpr int MR = 8, NV = 2;
#include "attention_tiles.inc"
#undef TT
}  // namespace avx512
#pragma GCC diagnostic pop
#endif

// The widest path this CPU has whose vector width divides the head dim, unless
// MLORA_GEMM_KERNEL (read at each call) asks for a narrower one.
const Kernels& pick_kernels(int64_t d) {
#ifdef MLORA_ATTN_X86
  const CpuFeatures& f = cpu_features();
  const char* env = std::getenv("MLORA_GEMM_KERNEL");
  const std::string want = env ? env : "";
  if (want == "scalar") return portable::kernels;
  const bool has_avx2 = f.avx2 && f.fma, has_avx512 = has_avx2 && f.avx512f && want != "avx2";
  if (has_avx512 && d % avx512::V::W == 0) return avx512::kernels;
  if (has_avx2 && d % avx2::V::W == 0) return avx2::kernels;
#else
  (void)d;
#endif
  return portable::kernels;
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

std::vector<Scratch> make_scratch(Exec& ex, const Problem& P, bool forward) {
  std::vector<Scratch> w;
  w.reserve(size_t(ex.pool().size()));
  for (int t = 0; t < ex.pool().size(); t++) w.emplace_back(P.d, P.group, forward);
  return w;
}

// Heaviest first, so the dynamic schedule ends with small items.
void sort_items(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
}

}  // namespace

void attention_forward(Exec& ex, float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* cu_seqlens, int64_t nseq, int64_t n, int64_t hq, int64_t hkv, int64_t d,
                       float scale) {
  const int64_t window = 0;
  check_cu_seqlens(cu_seqlens, nseq, n);
  if (n == 0 || d == 0) return;
  Problem P{q, k, v, nullptr, nullptr, nullptr, nullptr, out, lse, nullptr, nullptr, nullptr, cu_seqlens,
            n, hq, hkv, d, hq / hkv, hq * d, hkv * d, scale, window};
  std::vector<Item> items;
  for (int64_t s = 0; s < nseq; s++) {
    const int64_t T = cu_seqlens[s + 1] - cu_seqlens[s];
    for (int64_t g = 0; g < hkv; g++)
      for (int64_t ib = 0; ib * B < T; ib++) items.push_back({s, g, ib, (ib + 1) * std::min(B, T - ib * B)});
  }
  sort_items(items);
  std::vector<Scratch> scratch = make_scratch(ex, P, true);
  const Kernels& kern = pick_kernels(d);
  ex.pool().parallel_dynamic(int64_t(items.size()), [&](int64_t it, int tid) {
    const Item& x = items[size_t(it)];
    const int64_t r0 = cu_seqlens[x.seq], T = cu_seqlens[x.seq + 1] - r0;
    kern.forward(P, scratch[size_t(tid)], r0, T, x.head, x.block);
  });
}

void attention_backward(Exec& ex, float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* cu_seqlens, int64_t nseq,
                        int64_t n, int64_t hq, int64_t hkv, int64_t d, float scale) {
  const int64_t window = 0;
  check_cu_seqlens(cu_seqlens, nseq, n);
  if (n == 0 || d == 0) return;
  // Δ[h, row] = rowsum(dout ∘ out), the softmax backward's per-row term, once per row.
  std::vector<float> delta(size_t(hq * n));
  ex.pool().parallel_for(n, 64, [&](int64_t r0, int64_t r1, int) {
    for (int64_t row = r0; row < r1; row++)
      for (int64_t h = 0; h < hq; h++) {
        const float *a = dout + (row * hq + h) * d, *b = out + (row * hq + h) * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; c++) acc += a[c] * b[c];
        delta[size_t(h * n + row)] = acc;
      }
  });
  Problem P{q, k, v, out, dout, lse, delta.data(), nullptr, nullptr, dq, dk, dv, cu_seqlens,
            n, hq, hkv, d, hq / hkv, hq * d, hkv * d, scale, window};
  std::vector<Scratch> scratch = make_scratch(ex, P, false);
  const Kernels& kern = pick_kernels(d);
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
  // Few, long sequences: dk/dv per key tile, then dq per query tile.
  std::vector<Item> kv_items, q_items;
  for (int64_t s = 0; s < nseq; s++) {
    const int64_t T = cu_seqlens[s + 1] - cu_seqlens[s];
    const int64_t ntile = (T + B - 1) / B;
    for (int64_t b = 0; b < ntile; b++) {
      for (int64_t g = 0; g < hkv; g++) kv_items.push_back({s, g, b, ntile - b});
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
