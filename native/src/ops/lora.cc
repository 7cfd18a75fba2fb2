// Argument checks for the segmented multi-adapter LoRA kernels (cpu/lora.cc has the maths).
// x [rows, in] and y/dy [rows, out] (any leading shape: rows = numel / last dim). Each segment
// {rowStart, rowEnd, a [r,in], b [out,r], scale, dropout?, seed?, position?, xa [rowEnd-rowStart, r],
// da? [r,in], db? [out,r]} owns rows [rowStart, rowEnd), non-empty, inside [0, rows); segments
// do not overlap (any order). Ranks may differ between segments but must agree within one.
// The dropout mask is a function of (seed, position + row - rowStart, column): callers fold
// adapter id and optimizer step into `seed`, and pass the row's global position in `position`.
#include <algorithm>

#include "lora_segments.h"
#include "op.h"

namespace mlora {

namespace {

std::string num(int64_t v) { return std::to_string(v); }

}  // namespace

std::vector<LoraSegment> parse_segments(Args& a, int64_t rows, int64_t in, int64_t out, bool backward,
                                        const std::vector<std::pair<const char*, const TensorImpl*>>& io) {
  std::vector<Args> list = a.list("segments");
  std::vector<LoraSegment> segs;
  for (size_t k = 0; k < list.size(); k++) {
    Args& s = list[k];
    LoraSegment seg;
    seg.row_start = s.integer("rowStart");
    seg.row_end = s.integer("rowEnd");
    if (seg.row_start < 0 || seg.row_end > rows || seg.row_start >= seg.row_end)
      s.fail("rows [rowStart, rowEnd) = [" + num(seg.row_start) + ", " + num(seg.row_end) +
             ") must be a non-empty range inside [0, " + num(rows) + ")");
    const int64_t n = seg.row_end - seg.row_start;
    TensorImpl A = s.tensor("a", {DType::F32});
    if (A.shape.size() != 2 || A.shape[1] != in || A.shape[0] < 1)
      s.fail("argument 'a' has shape " + A.shape_str() + ", expected [r," + num(in) + "] (in from x) with r >= 1");
    const int64_t r = A.shape[0];
    TensorImpl B = s.tensor("b", {DType::F32});
    if (B.shape.size() != 2 || B.shape[0] != out || B.shape[1] != r)
      s.fail("argument 'b' has shape " + B.shape_str() + ", expected [" + num(out) + "," + num(r) +
             "] (out from y, rank " + num(r) + " from a)");
    TensorImpl xa = s.tensor("xa", {DType::F32});
    if (xa.shape.size() != 2 || xa.shape[0] != n || xa.shape[1] != r)
      s.fail("argument 'xa' has shape " + xa.shape_str() + ", expected [" + num(n) + "," + num(r) +
             "] (rowEnd - rowStart, rank " + num(r) + " from a)");
    for (auto& [name, t] : io) s.expect_distinct("xa", xa, name, *t);
    seg.rank = r;
    seg.scale = float(s.number("scale"));
    double p = s.number("dropout", 0.0);
    if (p < 0 || p >= 1) s.fail("argument 'dropout' must be in [0, 1), got " + std::to_string(p));
    seg.dropout = float(p);
    int64_t seed = s.integer("seed", 0);
    if (seed < 0) s.fail("argument 'seed' must be a non-negative integer, got " + num(seed));
    seg.seed = uint64_t(seed);
    seg.position = s.integer("position", 0);
    if (seg.position < 0) s.fail("argument 'position' must be >= 0, got " + num(seg.position));
    seg.a = A.as<float>();
    seg.b = B.as<float>();
    seg.xa = xa.as<float>();
    if (backward) {
      if (s.has("da")) {
        TensorImpl da = s.tensor("da", {DType::F32});
        if (da.shape.size() != 2 || da.shape[0] != r || da.shape[1] != in)
          s.fail("argument 'da' has shape " + da.shape_str() + ", expected [" + num(r) + "," + num(in) + "] (like a)");
        s.expect_distinct("da", da, "a", A);
        s.expect_distinct("da", da, "xa", xa);
        for (auto& [name, t] : io) s.expect_distinct("da", da, name, *t);
        seg.da = da.as<float>();
      }
      if (s.has("db")) {
        TensorImpl db = s.tensor("db", {DType::F32});
        if (db.shape.size() != 2 || db.shape[0] != out || db.shape[1] != r)
          s.fail("argument 'db' has shape " + db.shape_str() + ", expected [" + num(out) + "," + num(r) + "] (like b)");
        s.expect_distinct("db", db, "b", B);
        s.expect_distinct("db", db, "xa", xa);
        for (auto& [name, t] : io) s.expect_distinct("db", db, name, *t);
        seg.db = db.as<float>();
      }
    }
    segs.push_back(seg);
  }
  // no two segments share a row
  std::vector<size_t> order(segs.size());
  for (size_t i = 0; i < order.size(); i++) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t i, size_t j) { return segs[i].row_start < segs[j].row_start; });
  for (size_t q = 1; q < order.size(); q++) {
    const LoraSegment &p = segs[order[q - 1]], &c = segs[order[q]];
    if (c.row_start < p.row_end)
      a.fail("segments[" + num(int64_t(order[q - 1])) + "] rows [" + num(p.row_start) + ", " + num(p.row_end) +
             ") and segments[" + num(int64_t(order[q])) + "] rows [" + num(c.row_start) + ", " + num(c.row_end) +
             ") overlap; each row belongs to at most one adapter");
  }
  return segs;
}

namespace {

int64_t last_dim(Args& a, const char* name, const TensorImpl& t) {
  if (t.shape.empty() || t.shape.back() < 1)
    a.fail(std::string("argument '") + name + "' must have a non-empty last dimension, got " + t.shape_str());
  return t.shape.back();
}

}  // namespace

// lora_forward: per segment, xa = drop(x)·Aᵀ (saved), y += scale·xa·Bᵀ
MLORA_OP(lora_forward) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  int64_t in = last_dim(a, "x", x), out = last_dim(a, "y", y);
  int64_t rows = x.numel() / in;
  if (y.numel() != rows * out)
    a.fail("argument 'y' has shape " + y.shape_str() + ", expected [" + num(rows) + "," + num(out) + "] (rows from x)");
  a.expect_distinct("y", y, "x", x);
  std::vector<LoraSegment> segs = parse_segments(a, rows, in, out, false, {{"x", &x}, {"y", &y}});
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, lora_forward, y.as<float>(), x.as<float>(), segs.data(), int64_t(segs.size()), in, out);
  };
}

// lora_backward: per segment, dB += scale·dyᵀ·xa, dA += (scale·dy·B)ᵀ·drop(x), dx += drop'(scale·dy·B·A)
MLORA_OP(lora_backward) {
  TensorImpl dx = a.tensor("dx", {DType::F32});
  TensorImpl dy = a.tensor("dy", {DType::F32});
  TensorImpl x = a.tensor("x", {DType::F32});
  int64_t in = last_dim(a, "x", x), out = last_dim(a, "dy", dy);
  int64_t rows = x.numel() / in;
  if (dy.numel() != rows * out)
    a.fail("argument 'dy' has shape " + dy.shape_str() + ", expected [" + num(rows) + "," + num(out) +
           "] (rows from x)");
  if (dx.numel() != rows * in || dx.shape.back() != in)
    a.fail("argument 'dx' has shape " + dx.shape_str() + ", expected [" + num(rows) + "," + num(in) + "] (like x)");
  a.expect_distinct("dx", dx, "dy", dy);
  a.expect_distinct("dx", dx, "x", x);
  std::vector<LoraSegment> segs = parse_segments(a, rows, in, out, true, {{"x", &x}, {"dx", &dx}, {"dy", &dy}});
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, lora_backward, dx.as<float>(), dy.as<float>(), x.as<float>(), segs.data(), int64_t(segs.size()),
                   in, out);
  };
}

}  // namespace mlora
