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
// Sliding window (Mistral; window = W > 0): query i of a sequence sees keys j with
// i - W < j <= i (W keys including itself), transformers' sliding-window mask. Key tiles wholly
// outside every row's window are skipped (tile_visible); the tiles at the window's lower edge
// mask per row. window = 0: plain causal attention, bit for bit the same as without a window.
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
#include "simd.h"

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

// Per-thread scratch, sized once per call: forward, Qᵀ of the group's query heads (d×B each),
// their output accumulators and running max/sum; backward, the packed Kᵀ/Vᵀ tiles (d×B); both,
// the tile's scores (B×B) and, backward, their gradient.
struct Scratch {
  std::vector<float> qt, kt, vt, s, dp, o, m, l, rs;
  Scratch(int64_t d, int64_t group, bool forward)
      : qt(forward ? size_t(group * d * B) : 0),
        kt(forward ? 0 : size_t(d * B)),
        vt(forward ? 0 : size_t(d * B)),
        s(size_t(B * B)),
        dp(forward ? 0 : size_t(B * B)),
        o(forward ? size_t(group * B * d) : 0),
        m(forward ? size_t(group * B) : 0),
        l(forward ? size_t(group * B) : 0),
        rs(size_t(B)) {}
};

// Does any query row of [i0, i0+nq) see any key of [j0, j0+nb)? (positions within one sequence)
inline bool tile_visible(const Problem& P, int64_t i0, int64_t nq, int64_t j0, int64_t nb) {
  if (j0 > i0 + nq - 1) return false;                   // causal: keys after every query
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

}  // namespace

// ---- the tile code, once per instruction set (simd.h has the vector types and tile GEMMs).
#define MLORA_SIMD_TILES "attention_tiles.inc"
#include "simd_each.inc"
#undef MLORA_SIMD_TILES

namespace {

const Kernels& pick_kernels(int64_t d) {
  switch (simd::pick_isa({d})) {
#ifdef MLORA_SIMD_X86
    case simd::Isa::Avx512: return simd::avx512::kernels;
    case simd::Isa::Avx2: return simd::avx2::kernels;
#endif
    default: return simd::portable::kernels;
  }
}

// Runs on the calling thread before any worker starts, so the Error reaches JavaScript.
void check_cu_seqlens(const int32_t* cu, int64_t nseq, int64_t n) {
  if (cu[0] != 0) throw Error("argument 'cuSeqlens' must start at 0, got cuSeqlens[0] = " + std::to_string(cu[0]));
  for (int64_t s = 0; s < nseq; s++)
    if (cu[s + 1] < cu[s])
      throw Error("argument 'cuSeqlens' must be non-decreasing, got cuSeqlens[" + std::to_string(s + 1) + "] = " +
                  std::to_string(cu[s + 1]) + " < cuSeqlens[" + std::to_string(s) + "] = " + std::to_string(cu[s]));
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
                       float scale, int64_t window) {
  check_cu_seqlens(cu_seqlens, nseq, n);
  if (n == 0 || d == 0) return;
  Problem P{q,       k,          v, nullptr, nullptr, nullptr, nullptr,  out,    lse,     nullptr, nullptr,
            nullptr, cu_seqlens, n, hq,      hkv,     d,       hq / hkv, hq * d, hkv * d, scale,   window};
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
                        int64_t n, int64_t hq, int64_t hkv, int64_t d, float scale, int64_t window) {
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
  Problem P{q,  k,          v, out, dout, lse, delta.data(), nullptr, nullptr, dq,    dk,
            dv, cu_seqlens, n, hq,  hkv,  d,   hq / hkv,     hq * d,  hkv * d, scale, window};
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
