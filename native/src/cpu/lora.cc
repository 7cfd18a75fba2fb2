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
// Every product goes through cpu::gemm (with leading dimensions into the segment's rows), so the
// segments are processed one after another, each GEMM using the whole pool. The segmented call
// therefore equals a loop of single-segment calls bit for bit. The only scratch is a per-thread
// buffer (grown on demand, kept): the dropped x [rows, in] when p > 0, and dxa [rows, r].
#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/dropout_hash.h"
#include "../kernels.h"

namespace mlora::cpu {

namespace {

// y[i, :] = D(row i) ∘ src[i, :] for rows [0, rows); or, with accumulate, y += D ∘ src.
// src and y have leading dimension `in`.
void apply_mask(Exec& ex, float* y, const float* src, int64_t rows, int64_t in, const LoraSegment& s,
                bool accumulate) {
  const uint32_t threshold = dropout_threshold(s.dropout);
  const float keep_scale = dropout_keep_scale(s.dropout);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(in, 1));
  ex.pool().parallel_for(rows, grain, [&](int64_t r0, int64_t r1, int) {
    thread_local std::vector<float> mult;
    if (int64_t(mult.size()) < in + 1) mult.resize(size_t(in + 1));
    for (int64_t i = r0; i < r1; i++) {
      const uint64_t rowkey = dropout_rowkey(s.seed, s.position + i);
      for (int64_t c = 0; c < in; c += 2) {
        const uint64_t z = dropout_pair(rowkey, c);
        mult[size_t(c)] = uint32_t(z) < threshold ? 0.f : keep_scale;
        mult[size_t(c + 1)] = uint32_t(z >> 32) < threshold ? 0.f : keep_scale;
      }
      const float* si = src + i * in;
      float* yi = y + i * in;
      const float* mp = mult.data();
      if (accumulate) {
#pragma omp simd
        for (int64_t c = 0; c < in; c++) yi[c] += mp[c] * si[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < in; c++) yi[c] = mp[c] * si[c];
      }
    }
  });
}

float* scratch(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

WeightRef f32(const float* p) { return WeightRef{p, DType::F32}; }

}  // namespace

void lora_forward(Exec& ex, float* y, const float* x, const LoraSegment* segs, int64_t nseg, int64_t in,
                  int64_t out) {
  thread_local std::vector<float> dropped;
  for (int64_t k = 0; k < nseg; k++) {
    const LoraSegment& s = segs[k];
    const int64_t rows = s.row_end - s.row_start, r = s.rank;
    if (rows <= 0 || r <= 0) continue;
    const float* xs = x + s.row_start * in;
    const float* xin = xs;
    if (s.dropout > 0.f) {
      float* xd = scratch(dropped, rows * in);
      apply_mask(ex, xd, xs, rows, in, s, false);
      xin = xd;
    }
    gemm(ex, false, true, rows, r, in, 1.f, xin, in, f32(s.a), in, 0.f, s.xa, r);                    // xa = x·Aᵀ
    gemm(ex, false, true, rows, out, r, s.scale, s.xa, r, f32(s.b), r, 1.f, y + s.row_start * out, out);  // y += s·xa·Bᵀ
  }
}

void lora_backward(Exec& ex, float* dx, const float* dy, const float* x, const LoraSegment* segs, int64_t nseg,
                   int64_t in, int64_t out) {
  thread_local std::vector<float> dropped, dxa_buf;
  for (int64_t k = 0; k < nseg; k++) {
    const LoraSegment& s = segs[k];
    const int64_t rows = s.row_end - s.row_start, r = s.rank;
    if (rows <= 0 || r <= 0) continue;
    const float* xs = x + s.row_start * in;
    const float* dys = dy + s.row_start * out;
    float* dxs = dx + s.row_start * in;
    float* dxa = scratch(dxa_buf, rows * r);
    gemm(ex, false, false, rows, r, out, s.scale, dys, out, f32(s.b), r, 0.f, dxa, r);  // dxa = s·dy·B
    if (s.db) gemm(ex, true, false, out, r, rows, s.scale, dys, out, f32(s.xa), r, 1.f, s.db, r);  // dB += s·dyᵀ·xa
    if (s.dropout > 0.f) {
      float* buf = scratch(dropped, rows * in);
      if (s.da) {
        apply_mask(ex, buf, xs, rows, in, s, false);                                  // D ∘ x
        gemm(ex, true, false, r, in, rows, 1.f, dxa, r, f32(buf), in, 1.f, s.da, in);  // dA += dxaᵀ·(D∘x)
      }
      gemm(ex, false, false, rows, in, r, 1.f, dxa, r, f32(s.a), in, 0.f, buf, in);   // dxa·A
      apply_mask(ex, dxs, buf, rows, in, s, true);                                   // dx += D ∘ (dxa·A)
    } else {
      if (s.da) gemm(ex, true, false, r, in, rows, 1.f, dxa, r, f32(xs), in, 1.f, s.da, in);  // dA += dxaᵀ·x
      gemm(ex, false, false, rows, in, r, 1.f, dxa, r, f32(s.a), in, 1.f, dxs, in);          // dx += dxa·A
    }
  }
}

}  // namespace mlora::cpu
