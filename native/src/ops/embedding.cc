// Argument checks for the token embedding. Token ids are data: their range is checked inside the
// kernel (an out-of-range id rejects the run with an Error naming 'ids').
#include "op.h"

namespace mlora {

// embedding_forward: y[n,h] = table[ids[n]]; table [vocab,h] in f32/bf16/f16, ids i32 (n of them)
MLORA_OP(embedding_forward) {
  TensorImpl y = a.tensor("y", {DType::F32});
  TensorImpl ids = a.tensor("ids", {DType::I32});
  TensorImpl table = a.tensor("table", {DType::F32, DType::BF16, DType::F16});
  if (table.shape.size() != 2) a.fail("argument 'table' must be 2-D [vocab, hidden], got " + table.shape_str());
  int64_t vocab = table.shape[0], h = table.shape[1];
  int64_t n = ids.numel();
  if (y.numel() != n * h || (h > 0 && y.shape.back() != h))
    a.fail("argument 'y' has shape " + y.shape_str() + ", expected [" + std::to_string(n) + "," + std::to_string(h) +
           "]");
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, embedding_forward, y.as<float>(), ids.as<int32_t>(), weight(table), n, vocab, h);
  };
}

// embedding_backward: dtable[ids[n]] += dy[n]; dtable [vocab,h] f32
MLORA_OP(embedding_backward) {
  TensorImpl dtable = a.tensor("dtable", {DType::F32});
  TensorImpl dy = a.tensor("dy", {DType::F32});
  TensorImpl ids = a.tensor("ids", {DType::I32});
  if (dtable.shape.size() != 2) a.fail("argument 'dtable' must be 2-D [vocab, hidden], got " + dtable.shape_str());
  int64_t vocab = dtable.shape[0], h = dtable.shape[1];
  int64_t n = ids.numel();
  if (dy.numel() != n * h || (h > 0 && dy.shape.back() != h))
    a.fail("argument 'dy' has shape " + dy.shape_str() + ", expected [" + std::to_string(n) + "," + std::to_string(h) +
           "]");
  a.expect_distinct("dtable", dtable, "dy", dy);
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, embedding_backward, dtable.as<float>(), dy.as<float>(), ids.as<int32_t>(), n, vocab, h);
  };
}

}  // namespace mlora
