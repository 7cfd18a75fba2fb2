// Cross-entropy over the vocabulary, one row per token.
//   forward:  losses[i] = logsumexp(logits[i]) − logits[i, label[i]]      (0 where label < 0, e.g. −100)
//   backward (fused): the same losses, and dlogits[i] = weights[i]·(softmax(logits[i]) − onehot(label[i])),
//             a zero row where the label is ignored.
// Accumulation: losses and dlogits are written (=). dlogits may be the very same memory as logits
// (in place): each row reads logits[label] first, then each element is read before it is written.
// Losses are unweighted; `weights` only scales the gradient (e.g. 1/(tokens of the adapter)).
// Numerics: max-subtracted; exp is the vectorisable exp_approx (relative error ≈ 2e-7); the row sum
// of exponentials is accumulated in float simd blocks of 1024 folded into a double, and the
// log-sum-exp is formed in double. Rows run in parallel on the device's pool.
// Speed: the row loops are compiled three times (AVX-512, AVX2+FMA, baseline SSE2) and picked
// per call like swiglu's (simd::pick_isa, MLORA_GEMM_KERNEL): the exp polynomial is most of the
// work. The float block sums' lane order, and so their last bits, differ between the paths.
// Labels are checked on the calling thread first: one ≥ vocab is an Error.
#include <algorithm>
#include <cmath>
#include <string>

#include "../kernels.h"
#include "simd.h"
#include "vmath.h"

namespace mlora::cpu {

namespace {

void check_labels(const int32_t* labels, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; i++)
    if (labels[i] >= vocab)
      throw Error("argument 'labels': label " + std::to_string(labels[i]) + " at row " + std::to_string(i) +
                  " is out of range [0, " + std::to_string(vocab) + ") (negative labels are ignored)");
}

__attribute__((always_inline)) inline float row_max(const float* x, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; j++) m = std::max(m, x[j]);
  return m;
}

// Σ exp(x_j − m); when `store` is set, also writes each exp(x_j − m) into store[j] (may equal x).
__attribute__((always_inline)) inline double row_sumexp(const float* x, float* store, int64_t v, float m) {
  double total = 0;
  for (int64_t b = 0; b < v; b += 1024) {
    const int64_t e = std::min(v, b + 1024);
    float s = 0;
    if (store) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = b; j < e; j++) {
        const float ej = exp_approx(x[j] - m);
        store[j] = ej;
        s += ej;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = b; j < e; j++) s += exp_approx(x[j] - m);
    }
    total += double(s);
  }
  return total;
}

// One row's loss (forward: d null) or loss and dlogits (backward) for a label >= 0.
__attribute__((always_inline)) inline float row_loss(const float* x, float* d, int64_t v, int32_t label, float weight) {
  const float xl = x[label];  // read before an in-place write overwrites it
  const float m = row_max(x, v);
  const double sum = row_sumexp(x, d, v, m);
  if (d) {
    const float k = float(double(weight) / sum);
#pragma omp simd
    for (int64_t j = 0; j < v; j++) d[j] *= k;
    d[label] -= weight;
  }
  return float(double(m) + std::log(sum) - double(xl));
}

using RowLoss = float (*)(const float*, float*, int64_t, int32_t, float);
float row_loss_portable(const float* x, float* d, int64_t v, int32_t l, float w) { return row_loss(x, d, v, l, w); }
#ifdef MLORA_SIMD_X86
MLORA_TT_AVX2 float row_loss_avx2(const float* x, float* d, int64_t v, int32_t l, float w) {
  return row_loss(x, d, v, l, w);
}
MLORA_TT_AVX512 float row_loss_avx512(const float* x, float* d, int64_t v, int32_t l, float w) {
  return row_loss(x, d, v, l, w);
}
#endif

int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

}  // namespace

void cross_entropy_forward(Exec& ex, float* losses, const float* logits, const int32_t* labels, int64_t n,
                           int64_t vocab) {
  check_labels(labels, n, vocab);
  const RowLoss f = MLORA_SIMD_PICK(row_loss);
  ex.pool().parallel_for(n, row_grain(vocab), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++)
      losses[i] = labels[i] < 0 ? 0.f : f(logits + i * vocab, nullptr, vocab, labels[i], 0.f);
  });
}

void cross_entropy_backward(Exec& ex, float* losses, float* dlogits, const float* logits, const int32_t* labels,
                            const float* weights, int64_t n, int64_t vocab) {
  check_labels(labels, n, vocab);
  const RowLoss f = MLORA_SIMD_PICK(row_loss);
  ex.pool().parallel_for(n, row_grain(vocab), [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) {
      float* d = dlogits + i * vocab;
      if (labels[i] < 0) {
        losses[i] = 0.f;
        std::fill(d, d + vocab, 0.f);
        continue;
      }
      losses[i] = f(logits + i * vocab, d, vocab, labels[i], weights[i]);
    }
  });
}

}  // namespace mlora::cpu
