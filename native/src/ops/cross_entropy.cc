// Argument checks for cross-entropy. logits/dlogits [n, vocab] f32, labels [n] i32 (negative =
// ignored, e.g. -100; one >= vocab is rejected inside the kernel, labels being data), losses [n]
// f32, weights [n] f32 (per-row gradient scale). dlogits may be logits itself (in place).
#include "op.h"

namespace mlora {

namespace {
int64_t vocab_of(Args& a, const TensorImpl& logits) {
  if (logits.shape.size() != 2 || logits.shape[1] < 1)
    a.fail("argument 'logits' must be 2-D [n, vocab] with vocab >= 1, got " + logits.shape_str());
  return logits.shape[1];
}
}  // namespace

// cross_entropy_forward: losses[i] = logsumexp(logits[i]) - logits[i, labels[i]] (0 if ignored)
MLORA_OP(cross_entropy_forward) {
  TensorImpl losses = a.tensor("losses", {DType::F32});
  TensorImpl logits = a.tensor("logits", {DType::F32});
  TensorImpl labels = a.tensor("labels", {DType::I32});
  int64_t vocab = vocab_of(a, logits), n = logits.shape[0];
  a.expect_numel("labels", labels, n);
  a.expect_numel("losses", losses, n);
  a.expect_distinct("losses", losses, "logits", logits);
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, cross_entropy_forward, losses.as<float>(), logits.as<float>(), labels.as<int32_t>(), n, vocab);
  };
}

// cross_entropy_backward: the losses, and dlogits = weights[i]·(softmax - onehot) (zero rows if ignored)
MLORA_OP(cross_entropy_backward) {
  TensorImpl losses = a.tensor("losses", {DType::F32});
  TensorImpl dlogits = a.tensor("dlogits", {DType::F32});
  TensorImpl logits = a.tensor("logits", {DType::F32});
  TensorImpl labels = a.tensor("labels", {DType::I32});
  TensorImpl weights = a.tensor("weights", {DType::F32});
  int64_t vocab = vocab_of(a, logits), n = logits.shape[0];
  a.expect_shape("dlogits", dlogits, {n, vocab});
  a.expect_numel("labels", labels, n);
  a.expect_numel("losses", losses, n);
  a.expect_numel("weights", weights, n);
  if (dlogits.data() != logits.data()) a.expect_distinct("dlogits", dlogits, "logits", logits);
  a.expect_distinct("losses", losses, "logits", logits);
  a.expect_distinct("losses", losses, "dlogits", dlogits);
  a.expect_distinct("dlogits", dlogits, "weights", weights);
  a.expect_distinct("dlogits", dlogits, "labels", labels);
  return [=](Exec& ex) {
    MLORA_DISPATCH(ex, cross_entropy_backward, losses.as<float>(), dlogits.as<float>(), logits.as<float>(),
                   labels.as<int32_t>(), weights.as<float>(), n, vocab);
  };
}

}  // namespace mlora
