// Segmented multi-adapter LoRA (BatchLoRA): one call applies K adapters, each to its own
// contiguous row segment [row_start, row_end) of x/y, with its own rank r, scale, dropout p,
// seed and position. Rows no segment covers get no LoRA delta.
//
// Forward, per segment (x_s, y_s its rows; D = the dropout mask, 1/(1-p) on kept elements):
//   xa  = (D ∘ x_s) · Aᵀ                 [rows, r]  saved into the segment's xa
//   y_s += scale · xa · Bᵀ               [rows, out]
// Backward:
//   dxa  = scale · dy_s · B              [rows, r]  (scratch)
//   dB  += scale · dy_sᵀ · xa            [out, r]
//   dA  += dxaᵀ · (D ∘ x_s)              [r, in]
//   dx_s += D ∘ (dxa · A)                [rows, in]
// Accumulation: y += (the LoRA delta adds onto the base layer's output), dA and dB += (gradient
// accumulation over micro-batches), dx += (it adds onto the base path's dX). xa is written.
// The scale is folded into B once per call (y += xa·(scale·Bᵀ), dxa = dy·(scale·B)).
//
// Dropout as PEFT: applied to the input of lora_A, kept elements scaled by 1/(1-p). The mask is
// never stored: element (row, col) of a segment is dropped iff
//   u32(row, col) < floor(p · 2^32),
// where u32 is a half of splitmix64's finaliser applied to a per-row key mixed with the column
// pair: rowkey = mix64(seed ^ mix64(position + row + golden)), z = mix64(rowkey + (col/2)·golden'),
// u32 = low 32 bits of z for even col, high 32 bits for odd col. So it is a pure function of
// (seed, position + row-in-segment, col): forward, backward and a replay agree bit for bit, and a
// segment's mask does not depend on where its rows sit in the batch. The caller folds adapter and
// step into `seed` (DESIGN §5). With p = 0 no mask is computed at all.
//
// Speed: rows are independent in every product but dA and dB, so the work is split into
// blocks of rows handed out dynamically over all segments at once; backward's items are groups
// of kGroupRows rows of a segment, each summing its own share of dA and dB (the shares are then
// added in group order, and group bounds depend on the segment alone). Each item is a few tile
// GEMMs on register-blocked micro-tiles (simd.h / tile_gemm.inc; AVX-512, AVX2 or portable, the
// widest whose vector width divides in and out): forward reads a row block of x once and
// updates its y rows once (xa stays in L1 between shrink and expand); backward reads each chunk
// of dy and x rows once from memory for dxa, dB and dA together. The per-segment operands Aᵀ,
// scale·Bᵀ, scale·B and A are packed once per call. A row's results do not depend on the block
// it falls in, the thread that runs it or the other segments, so the segmented call equals a
// loop of single-segment calls bit for bit, for any thread count.
//
// linear_lora_forward / linear_lora_backward (a projection with its LoRA, one op): the shrink
// (forward xa; backward dxa, dA, dB) runs first, then the base GEMM adds the expand to each
// finished tile of y / dx through gemm_epilogue.h while the tile is in L1, so y / dx are not
// read and written once more. The expand does the same arithmetic, element by element, as
// lora_forward's / lora_backward's, so fused and separate ops agree bit for bit.
//
// Scratch (the calling thread's, grown on demand and kept; never counted against the device
// budget): packed operands r·(2·in + 2·out) per segment, dxa [rows, rp], dB's share [r, out] per
// row group, dA's [r, in] per row group after the first and, with dropout, D∘x [rows, in] for
// backward; a block of rows × (rp + in) per pool thread.
#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/dropout_hash.h"
#include "../kernels.h"
#include "gemm_epilogue.h"
#include "simd.h"

namespace mlora::cpu {

namespace {

constexpr int64_t RB = 64;           // rows per block
constexpr int64_t kRowChunk = 64;    // backward: rows whose dy and x one step of a group pass reads
constexpr int64_t kGroupRows = 512;  // backward: rows of a segment one work item sums dA and dB over
// The expand operands (forward scale·Bᵀ, backward A: r rows × out or in columns) are stored in
// panels of kPanel columns, each panel r × kPanel contiguous: a GEMM epilogue tile (at most 32
// columns, gemm.cc's never cross a multiple of 32) reads its r × 32 block as one contiguous 2 KiB
// run instead of r rows a whole operand row apart.
constexpr int64_t kPanel = 32;

// Panel layout of an r × cols operand: element (c, j) at panel_at(r, c, j).
inline int64_t panel_at(int64_t r, int64_t c, int64_t j) { return j / kPanel * r * kPanel + c * kPanel + j % kPanel; }
inline int64_t panel_floats(int64_t r, int64_t cols) { return (cols + kPanel - 1) / kPanel * kPanel * r; }

struct LoraCall {
  const float *x, *dy;
  float *y, *dx;
  int64_t in, out;
};

// One segment's packed operands and backward scratch.
struct SegmentOps {
  const LoraSegment* seg;
  int64_t rp;       // rank rounded up to the vector width
  const float* at;  // forward: Aᵀ [in, rp], zero-padded columns
  const float* bt;  // forward: scale·Bᵀ [r, out] in panels
  const float* bs;  // backward: scale·B [out, rp], zero-padded columns
  const float* ap;  // backward: A [r, in] in panels
  float* dxa;       // backward: dy·(scale·B) [rows, rp]
  float* xd;        // backward with dropout and dA: D∘x [rows, in]; else null
  float* dbt;       // backward: xaᵀ·dy [r, out] of each row group (groups × r × out)
  float* dap;       // backward: dA of each row group after the first ((groups - 1) × r × in)
  int64_t groups;   // backward: row groups of kGroupRows
};

// dst[i, :] = D(row i0+i) ∘ src[i, :] for rows [0, rows) of a segment (dst += with accumulate).
void mask_rows(float* dst, const float* src, int64_t rows, int64_t in, const LoraSegment& s, int64_t i0,
               bool accumulate) {
  const uint32_t threshold = dropout_threshold(s.dropout);
  const float keep_scale = dropout_keep_scale(s.dropout);
  thread_local std::vector<float> mult;
  if (int64_t(mult.size()) < in + 1) mult.resize(size_t(in + 1));
  for (int64_t i = 0; i < rows; i++) {
    const uint64_t rowkey = dropout_rowkey(s.seed, s.position + i0 + i);
    for (int64_t c = 0; c < in; c += 2) {
      const uint64_t z = dropout_pair(rowkey, c);
      mult[size_t(c)] = uint32_t(z) < threshold ? 0.f : keep_scale;
      mult[size_t(c + 1)] = uint32_t(z >> 32) < threshold ? 0.f : keep_scale;
    }
    const float* si = src + i * in;
    float* di = dst + i * in;
    const float* mp = mult.data();
    if (accumulate) {
#pragma omp simd
      for (int64_t c = 0; c < in; c++) di[c] += mp[c] * si[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < in; c++) di[c] = mp[c] * si[c];
    }
  }
}

// The epilogue's stack buffer: a GEMM tile (gemm.cc's are at most 32×32) in one piece,
// anything wider in chunks of rows (n <= kTileFloats: tiles are at most 32 columns wide).
constexpr int64_t kTileFloats = 32 * 32;

// c[i, :] += D(row row0+i of the segment, columns j0..j0+n) ∘ tmp[i, :], rows [0, rows).
void mask_tile_add(float* c, int64_t ldc, const float* tmp, int64_t rows, int64_t n, int64_t j0, const LoraSegment& s,
                   int64_t row0) {
  for (int64_t i = 0; i < rows; i++) {
    float* ci = c + i * ldc;
    const float* ti = tmp + i * n;
    const uint64_t rowkey = dropout_rowkey(s.seed, s.position + row0 + i);
    for (int64_t j = 0; j < n; j++) {
      const uint64_t z = dropout_pair(rowkey, j0 + j);
      const uint32_t u = ((j0 + j) & 1) ? uint32_t(z >> 32) : uint32_t(z);
      ci[j] += (u < dropout_threshold(s.dropout) ? 0.f : dropout_keep_scale(s.dropout)) * ti[j];
    }
  }
}

struct LoraKernels {
  float* (*shrink_block)(const LoraCall&, const SegmentOps&, int64_t i0, int64_t rb, float* work);
  void (*forward_block)(const LoraCall&, const SegmentOps&, int64_t i0, int64_t rb, float* work);
  void (*group)(const LoraCall&, const SegmentOps&, int64_t i0, int64_t rows, float* dbt, float* da, bool da_add);
  void (*rows_dx)(const LoraCall&, const SegmentOps&, int64_t i0, int64_t rb, float* work);
  void (*epilogue)(const LoraCall&, const std::vector<SegmentOps>&, bool backward, int64_t i0, int64_t m, int64_t j0,
                   int64_t n, float* c, int64_t ldc);
  int64_t width;  // the vector width: xa / dxa rows are padded to a multiple of it
};

}  // namespace

#define MLORA_SIMD_TILES "lora_tiles.inc"
#include "simd_each.inc"
#undef MLORA_SIMD_TILES

namespace {

const LoraKernels& pick_isa(int64_t in, int64_t out) {
  switch (simd::pick_isa({in, out})) {
#ifdef MLORA_SIMD_X86
    case simd::Isa::Avx512: return simd::avx512::kernels;
    case simd::Isa::Avx2: return simd::avx2::kernels;
#endif
    default: return simd::portable::kernels;
  }
}

float* grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

struct Item {
  int64_t seg, start, count;
};

// Row-block items of every segment with rows and rank.
std::vector<Item> row_items(const std::vector<SegmentOps>& ops) {
  std::vector<Item> items;
  for (size_t k = 0; k < ops.size(); k++) {
    const int64_t rows = ops[k].seg->row_end - ops[k].seg->row_start;
    for (int64_t i0 = 0; i0 < rows; i0 += RB) items.push_back({int64_t(k), i0, std::min(RB, rows - i0)});
  }
  return items;
}

bool active(const LoraSegment& s) { return s.row_end > s.row_start && s.rank > 0; }

// The segments with rows and rank, their rank padded to `width`; `floats(segment, rp)` is the
// packed scratch each needs, all of it returned in one block of `packed`.
template <class Floats>
std::vector<SegmentOps> active_ops(const LoraSegment* segs, int64_t nseg, int64_t width, std::vector<float>& packed,
                                   float*& p, Floats floats) {
  std::vector<SegmentOps> ops;
  size_t need = 0;
  for (int64_t k = 0; k < nseg; k++)
    if (active(segs[k])) {
      const int64_t rp = (segs[k].rank + width - 1) / width * width;
      ops.push_back({&segs[k], rp, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0});
      need += size_t(floats(segs[k], rp));
    }
  p = grow(packed, need);
  return ops;
}

// Forward operands of every segment with rows and rank: Aᵀ [in, rp] and scale·Bᵀ [r, out] (panels).
std::vector<SegmentOps> prepare_forward(const LoraSegment* segs, int64_t nseg, int64_t in, int64_t out, int64_t width,
                                        std::vector<float>& packed) {
  float* p = nullptr;
  std::vector<SegmentOps> ops = active_ops(segs, nseg, width, packed, p, [&](const LoraSegment& s, int64_t rp) {
    return in * rp + panel_floats(s.rank, out);
  });
  for (SegmentOps& g : ops) {
    const LoraSegment& s = *g.seg;
    float* at = p;
    simd::pack_transposed_scalar(at, g.rp, s.a, in, 0, s.rank, in);  // Aᵀ [in, rp]
    float* bt = at + in * g.rp;
    for (int64_t o = 0; o < out; o++)
      for (int64_t c = 0; c < s.rank; c++) bt[panel_at(s.rank, c, o)] = s.scale * s.b[o * s.rank + c];
    g.at = at, g.bt = bt;
    p = bt + panel_floats(s.rank, out);
  }
  return ops;
}

int64_t max_rp(const std::vector<SegmentOps>& ops) {
  int64_t m = 0;
  for (const SegmentOps& g : ops) m = std::max(m, g.rp);
  return m;
}

// Backward operands and scratch of every segment with rows and rank: scale·B [out, rp], A [r, in]
// (panels), dxa [rows, rp], D∘x [rows, in] (dropout and dA only), xaᵀ·dy [r, out] per row group, and dA
// [r, in] per row group after the first (the first adds straight onto da).
std::vector<SegmentOps> prepare_backward(const LoraSegment* segs, int64_t nseg, int64_t in, int64_t out, int64_t width,
                                         std::vector<float>& packed) {
  float* p = nullptr;
  auto groups = [](const LoraSegment& s) { return (s.row_end - s.row_start + kGroupRows - 1) / kGroupRows; };
  std::vector<SegmentOps> ops = active_ops(segs, nseg, width, packed, p, [&](const LoraSegment& s, int64_t rp) {
    const int64_t rows = s.row_end - s.row_start;
    return out * rp + panel_floats(s.rank, in) + rows * rp + (s.dropout > 0.f && s.da ? rows * in : 0) +
           groups(s) * s.rank * out + (s.da ? (groups(s) - 1) * s.rank * in : 0);
  });
  for (SegmentOps& g : ops) {
    const LoraSegment& s = *g.seg;
    const int64_t rows = s.row_end - s.row_start;
    float* bs = p;  // scale·B [out, rp]
    for (int64_t o = 0; o < out; o++) {
      for (int64_t c = 0; c < s.rank; c++) bs[o * g.rp + c] = s.scale * s.b[o * s.rank + c];
      std::fill(bs + o * g.rp + s.rank, bs + (o + 1) * g.rp, 0.f);
    }
    g.bs = bs;
    float* ap = bs + out * g.rp;
    for (int64_t c = 0; c < s.rank; c++)
      for (int64_t i = 0; i < in; i++) ap[panel_at(s.rank, c, i)] = s.a[c * in + i];
    g.ap = ap;
    g.dxa = ap + panel_floats(s.rank, in);
    p = g.dxa + rows * g.rp;
    if (s.dropout > 0.f && s.da) g.xd = p, p += rows * in;
    g.groups = groups(s);
    g.dbt = p;
    p += g.groups * s.rank * out;
    if (s.da) g.dap = p, p += (g.groups - 1) * s.rank * in;
  }
  return ops;
}

// Backward without the base GEMM: one pass over each row group of every segment (its dxa and its
// share of dA and dB), then the groups' shares summed in group order (group boundaries depend on
// the segment alone, so dA and dB do not depend on the thread count), dBᵀ added into dB and,
// with with_dx, dx by row blocks.
void backward_passes(Exec& ex, const LoraKernels& K, const std::vector<SegmentOps>& ops, const LoraCall& C,
                     bool with_dx, std::vector<float>& work) {
  std::vector<Item> groups;
  for (size_t k = 0; k < ops.size(); k++) {
    const int64_t rows = ops[k].seg->row_end - ops[k].seg->row_start;
    for (int64_t i0 = 0; i0 < rows; i0 += kGroupRows)
      groups.push_back({int64_t(k), i0, std::min(kGroupRows, rows - i0)});
  }
  ex.pool().parallel_dynamic(int64_t(groups.size()), [&](int64_t it, int) {
    const Item& b = groups[size_t(it)];
    const SegmentOps& g = ops[size_t(b.seg)];
    const LoraSegment& s = *g.seg;
    const int64_t q = b.start / kGroupRows;
    float* dbt = s.db ? g.dbt + q * s.rank * C.out : nullptr;
    float* da = !s.da ? nullptr : q == 0 ? s.da : g.dap + (q - 1) * s.rank * C.in;
    K.group(C, g, b.start, b.count, dbt, da, q == 0);
  });
  ex.pool().parallel_dynamic(int64_t(2 * ops.size()), [&](int64_t it, int) {
    const SegmentOps& g = ops[size_t(it / 2)];
    const LoraSegment& s = *g.seg;
    const int64_t r = s.rank;
    if (it % 2 == 0 && s.da) {
      for (int64_t q = 1; q < g.groups; q++) {
        const float* part = g.dap + (q - 1) * r * C.in;
#pragma omp simd
        for (int64_t i = 0; i < r * C.in; i++) s.da[i] += part[i];
      }
    } else if (it % 2 == 1 && s.db) {
      for (int64_t q = 1; q < g.groups; q++) {
        const float* part = g.dbt + q * r * C.out;
#pragma omp simd
        for (int64_t i = 0; i < r * C.out; i++) g.dbt[i] += part[i];
      }
      for (int64_t o = 0; o < C.out; o++)
        for (int64_t k = 0; k < r; k++) s.db[o * r + k] += s.scale * g.dbt[k * C.out + o];
    }
  });
  if (!with_dx) return;
  const std::vector<Item> rows = row_items(ops);
  const int64_t per_thread = RB * C.in;
  float* w = grow(work, size_t(per_thread * ex.pool().size()));
  ex.pool().parallel_dynamic(int64_t(rows.size()), [&](int64_t it, int tid) {
    const Item& b = rows[size_t(it)];
    K.rows_dx(C, ops[size_t(b.seg)], b.start, b.count, w + tid * per_thread);
  });
}

// The epilogue of the fused projections' base GEMM. A tile narrower than the LoRA kernel's
// vector width (only when the GEMM runs a narrower kernel than LoRA picked) uses the portable
// tile code, which reads the same operands.
struct EpilogueCtx {
  const LoraCall* C;
  const std::vector<SegmentOps>* ops;
  const LoraKernels* k;
  bool backward;
};

GemmEpilogue lora_epilogue(const EpilogueCtx& ctx) {
  return {[](const void* p, int64_t i0, int64_t m, int64_t j0, int64_t n, float* c, int64_t ldc) {
            const EpilogueCtx& e = *static_cast<const EpilogueCtx*>(p);
            const LoraKernels& k = n % e.k->width == 0 ? *e.k : simd::portable::kernels;
            k.epilogue(*e.C, *e.ops, e.backward, i0, m, j0, n, c, ldc);
          },
          &ctx};
}

}  // namespace

void lora_forward(Exec& ex, float* y, const float* x, const LoraSegment* segs, int64_t nseg, int64_t in, int64_t out) {
  const LoraKernels& K = pick_isa(in, out);
  thread_local std::vector<float> packed, work;
  const std::vector<SegmentOps> ops = prepare_forward(segs, nseg, in, out, K.width, packed);
  if (ops.empty()) return;
  const int64_t per_thread = RB * (max_rp(ops) + in);
  float* w = grow(work, size_t(per_thread * ex.pool().size()));
  const std::vector<Item> items = row_items(ops);
  const LoraCall C{x, nullptr, y, nullptr, in, out};
  ex.pool().parallel_dynamic(int64_t(items.size()), [&](int64_t it, int tid) {
    const Item& b = items[size_t(it)];
    K.forward_block(C, ops[size_t(b.seg)], b.start, b.count, w + tid * per_thread);
  });
}

void lora_backward(Exec& ex, float* dx, const float* dy, const float* x, const LoraSegment* segs, int64_t nseg,
                   int64_t in, int64_t out) {
  const LoraKernels& K = pick_isa(in, out);
  thread_local std::vector<float> packed, work;
  const std::vector<SegmentOps> ops = prepare_backward(segs, nseg, in, out, K.width, packed);
  if (ops.empty()) return;
  backward_passes(ex, K, ops, LoraCall{x, dy, nullptr, dx, in, out}, true, work);
}

void linear_lora_forward(Exec& ex, float* y, const float* x, WeightRef w, int64_t m, int64_t n, int64_t k,
                         bool accumulate, const LoraSegment* segs, int64_t nseg) {
  const int64_t in = k, out = n;
  const LoraKernels& K = pick_isa(in, out);
  thread_local std::vector<float> packed, work;
  const std::vector<SegmentOps> ops = prepare_forward(segs, nseg, in, out, K.width, packed);
  const LoraCall C{x, nullptr, y, nullptr, in, out};
  if (!ops.empty()) {  // xa of every row first: the GEMM's epilogue reads it
    const int64_t per_thread = RB * (max_rp(ops) + in);
    float* wk = grow(work, size_t(per_thread * ex.pool().size()));
    const std::vector<Item> items = row_items(ops);
    ex.pool().parallel_dynamic(int64_t(items.size()), [&](int64_t it, int tid) {
      const Item& b = items[size_t(it)];
      K.shrink_block(C, ops[size_t(b.seg)], b.start, b.count, wk + tid * per_thread);
    });
  }
  const EpilogueCtx ctx{&C, &ops, &K, false};
  gemm(ex, false, true, m, n, k, 1.f, x, k, w, k, accumulate ? 1.f : 0.f, y, n, lora_epilogue(ctx));
}

void linear_lora_backward(Exec& ex, float* dx, const float* dy, const float* x, WeightRef w, int64_t m, int64_t n,
                          int64_t k, bool accumulate, const LoraSegment* segs, int64_t nseg) {
  const int64_t in = k, out = n;
  const LoraKernels& K = pick_isa(in, out);
  thread_local std::vector<float> packed, work;
  const std::vector<SegmentOps> ops = prepare_backward(segs, nseg, in, out, K.width, packed);
  const LoraCall C{x, dy, nullptr, dx, in, out};
  if (!ops.empty()) backward_passes(ex, K, ops, C, false, work);  // dxa (the epilogue reads it), dA, dB
  const EpilogueCtx ctx{&C, &ops, &K, true};
  gemm(ex, false, false, m, k, n, 1.f, dy, n, w, k, accumulate ? 1.f : 0.f, dx, k, lora_epilogue(ctx));
}

}  // namespace mlora::cpu
