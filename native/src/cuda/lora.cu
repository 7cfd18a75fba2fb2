// Segmented multi-adapter LoRA (BatchLoRA): one call applies K adapters, each to its own
// contiguous row segment, with its own rank, scale and dropout. Every product below is ONE
// launch of the grouped tiled GEMM (gemm.cu) for all segments of the call (up to 64 per
// launch), not one launch per adapter:
//   forward   F1  xa  = drop(x)·Aᵀ                  [rows, r]   (=, saved for backward)
//             F2  y  += scale·xa·Bᵀ                 [rows, out]
//   backward  B1  g   = scale·dy·B                  [rows, r]   (scratch)
//             B2  dB += scale·dyᵀ·xa                [out, r]
//             B3  dA += gᵀ·drop(x)                  [r, in]
//             B4  dx += drop'(g·A)                  [rows, in]  (same mask, applied to the product)
// The dropout mask is a function of (seed, position + row, column) from core/dropout_hash.h,
// the same as the CPU kernel's, applied while loading x (F1, B3) or storing dx (B4); never stored.
// Accumulation: y, dx, dA, dB +=; xa =. Reductions over rows (dA, dB) are computed by one
// block per output tile in a fixed order: deterministic.
#include <vector>

#include "common.cuh"

namespace mlora::cuda {

namespace {

int64_t rows_of(const LoraSegment& s) { return s.row_end - s.row_start; }
bool active(const LoraSegment& s) { return rows_of(s) > 0 && s.rank > 0; }

GemmProblem problem(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                    int64_t n, int64_t k, float alpha, float beta, const LoraSegment& s) {
  return GemmProblem{a, b, c, lda, ldb, ldc, m, n, k, alpha, beta, s.dropout, s.seed, s.position};
}

void check_segments(const LoraSegment* segs, int64_t nseg, const char* what) {
  for (int64_t i = 0; i < nseg; i++) {
    const LoraSegment& s = segs[i];
    if (s.row_start < 0 || s.row_end < s.row_start || s.rank < 0)
      throw Error(std::string(what) + ": segment " + std::to_string(i) + " has rows [" + std::to_string(s.row_start) +
                  ", " + std::to_string(s.row_end) + ") and rank " + std::to_string(s.rank));
    if (active(s) && (!s.a || !s.b))
      throw Error(std::string(what) + ": segment " + std::to_string(i) + " has no A or B");
    if (!(s.dropout >= 0.f && s.dropout < 1.f))
      throw Error(std::string(what) + ": segment " + std::to_string(i) + " has dropout " + std::to_string(s.dropout) +
                  " (must be in [0, 1))");
  }
}

// Problems whose outputs are per-adapter (dA, dB) may not share an output in one launch (two
// segments of one adapter would race on it). Splits them into waves of distinct outputs.
void run_waves(Exec& ex, std::vector<GemmProblem>& probs, bool ta, bool tb, DropWhere drop) {
  while (!probs.empty()) {
    std::vector<GemmProblem> wave, rest;
    for (auto& p : probs) {
      bool clash = false;
      for (auto& w : wave) clash = clash || w.c == p.c;
      (clash ? rest : wave).push_back(p);
    }
    grouped_gemm(ex, wave.data(), int(wave.size()), ta, tb, DType::F32, drop);
    probs.swap(rest);
  }
}

// Offsets of each active segment's [rows, rank] block inside one scratch buffer.
std::vector<int64_t> rank_offsets(const LoraSegment* segs, int64_t nseg, int64_t* total) {
  std::vector<int64_t> off(size_t(nseg), 0);
  int64_t t = 0;
  for (int64_t i = 0; i < nseg; i++) {
    off[size_t(i)] = t;
    if (active(segs[i])) t += rows_of(segs[i]) * segs[i].rank;
  }
  *total = t;
  return off;
}

// F1 for every active segment: xa[i] = drop(x_i)·A_iᵀ.
void compute_xa(Exec& ex, const float* x, const LoraSegment* segs, int64_t nseg, int64_t in,
                const std::vector<float*>& xa) {
  std::vector<GemmProblem> f1;
  for (int64_t i = 0; i < nseg; i++) {
    const LoraSegment& s = segs[i];
    if (!active(s)) continue;
    f1.push_back(
        problem(x + s.row_start * in, in, s.a, in, xa[size_t(i)], s.rank, rows_of(s), s.rank, in, 1.f, 0.f, s));
  }
  grouped_gemm(ex, f1.data(), int(f1.size()), false, true, DType::F32, kDropA);
}

}  // namespace

void lora_forward(Exec& ex, float* y, const float* x, const LoraSegment* segs, int64_t nseg, int64_t in, int64_t out) {
  check_segments(segs, nseg, "lora_forward");
  enter(ex);
  int64_t total = 0;
  std::vector<int64_t> off = rank_offsets(segs, nseg, &total);
  bool need_scratch = false;
  for (int64_t i = 0; i < nseg; i++) need_scratch = need_scratch || (active(segs[i]) && !segs[i].xa);
  Scratch tmp(ex, need_scratch ? size_t(total) * sizeof(float) : 1);
  std::vector<float*> xa(size_t(nseg), nullptr);
  for (int64_t i = 0; i < nseg; i++) xa[size_t(i)] = segs[i].xa ? segs[i].xa : tmp.as<float>() + off[size_t(i)];
  compute_xa(ex, x, segs, nseg, in, xa);
  std::vector<GemmProblem> f2;
  for (int64_t i = 0; i < nseg; i++) {
    const LoraSegment& s = segs[i];
    if (!active(s)) continue;
    f2.push_back(problem(xa[size_t(i)], s.rank, s.b, s.rank, y + s.row_start * out, out, rows_of(s), out, s.rank,
                         s.scale, 1.f, s));
  }
  grouped_gemm(ex, f2.data(), int(f2.size()), false, true, DType::F32, kDropNone);
}

void lora_backward(Exec& ex, float* dx, const float* dy, const float* x, const LoraSegment* segs, int64_t nseg,
                   int64_t in, int64_t out) {
  check_segments(segs, nseg, "lora_backward");
  enter(ex);
  int64_t total = 0;
  std::vector<int64_t> off = rank_offsets(segs, nseg, &total);
  bool recompute = false;
  for (int64_t i = 0; i < nseg; i++) recompute = recompute || (active(segs[i]) && !segs[i].xa);
  // [g for every segment | recomputed xa where forward's was not kept]
  Scratch tmp(ex, size_t(total) * sizeof(float) * (recompute ? 2 : 1));
  float* g = tmp.as<float>();
  std::vector<float*> xa(size_t(nseg), nullptr);
  for (int64_t i = 0; i < nseg; i++) xa[size_t(i)] = segs[i].xa ? segs[i].xa : g + total + off[size_t(i)];
  if (recompute) compute_xa(ex, x, segs, nseg, in, xa);

  std::vector<GemmProblem> b1, b2, b3, b4;
  for (int64_t i = 0; i < nseg; i++) {
    const LoraSegment& s = segs[i];
    if (!active(s)) continue;
    int64_t rows = rows_of(s), r = s.rank;
    float* gi = g + off[size_t(i)];
    const float* dyi = dy + s.row_start * out;
    const float* xi = x + s.row_start * in;
    b1.push_back(problem(dyi, out, s.b, r, gi, r, rows, r, out, s.scale, 0.f, s));
    if (s.db) b2.push_back(problem(dyi, out, xa[size_t(i)], r, s.db, r, out, r, rows, s.scale, 1.f, s));
    if (s.da) b3.push_back(problem(gi, r, xi, in, s.da, in, r, in, rows, 1.f, 1.f, s));
    if (dx) b4.push_back(problem(gi, r, s.a, in, dx + s.row_start * in, in, rows, in, r, 1.f, 1.f, s));
  }
  grouped_gemm(ex, b1.data(), int(b1.size()), false, false, DType::F32, kDropNone);
  run_waves(ex, b2, true, false, kDropNone);
  run_waves(ex, b3, true, false, kDropB);
  grouped_gemm(ex, b4.data(), int(b4.size()), false, false, DType::F32, kDropC);
}

// The projection with its LoRA: the two ops one after the other (the CPU backend fuses them).
void linear_lora_forward(Exec& ex, float* y, const float* x, WeightRef w, int64_t m, int64_t n, int64_t k,
                         bool accumulate, const LoraSegment* segs, int64_t nseg) {
  linear_forward(ex, y, x, w, m, n, k, accumulate);
  lora_forward(ex, y, x, segs, nseg, k, n);
}

void linear_lora_backward(Exec& ex, float* dx, const float* dy, const float* x, WeightRef w, int64_t m, int64_t n,
                          int64_t k, bool accumulate, const LoraSegment* segs, int64_t nseg) {
  linear_backward(ex, dx, dy, w, m, n, k, accumulate);
  lora_backward(ex, dx, dy, x, segs, nseg, k, n);
}

}  // namespace mlora::cuda
