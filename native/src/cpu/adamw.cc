// AdamW with PyTorch semantics (torch.optim.AdamW, amsgrad off, maximize off), over many tensors
// in one call, parallel across all their elements together:
//   g' = g · grad_scale
//   p ← p · (1 − lr·wd)                                  (decoupled weight decay)
//   m ← β1·m + (1 − β1)·g'
//   v ← β2·v + (1 − β2)·g'²
//   p ← p − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)     t = step ≥ 1
// Accumulation: params, m and v are updated in place; grads are read only (the caller zeroes them).
// Bias corrections are computed once in double; the elementwise update is float, as in PyTorch's
// foreach path for f32 tensors.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"

namespace mlora::cpu {

void adamw(Exec& ex, float* const* params, const float* const* grads, float* const* m, float* const* v,
           const int64_t* ns, int64_t count, double lr, double beta1, double beta2, double eps, double weight_decay,
           int64_t step, float grad_scale) {
  if (count <= 0) return;
  if (step < 1) throw Error("argument 'step' must be >= 1, got " + std::to_string(step));
  std::vector<int64_t> start(size_t(count) + 1, 0);  // element offsets of each tensor in the union
  for (int64_t t = 0; t < count; t++) start[size_t(t + 1)] = start[size_t(t)] + ns[t];
  const int64_t total = start[size_t(count)];
  const double bc1 = 1.0 - std::pow(double(beta1), double(step));
  const double bc2 = 1.0 - std::pow(double(beta2), double(step));
  const float step_size = float(double(lr) / bc1);
  const float inv_bc2_sqrt = float(1.0 / std::sqrt(bc2));
  const float decay = float(1.0 - double(lr) * double(weight_decay));
  const float b1 = float(beta1), b2 = float(beta2), omb1 = float(1.0 - beta1), omb2 = float(1.0 - beta2);
  const float epsf = float(eps);
  ex.pool().parallel_for(total, 1 << 14, [&](int64_t b, int64_t e, int) {
    // first tensor that holds element b
    int64_t t = int64_t(std::upper_bound(start.begin(), start.end(), b) - start.begin()) - 1;
    for (int64_t pos = b; pos < e; t++) {
      const int64_t lo = pos - start[size_t(t)];
      const int64_t hi = std::min(e, start[size_t(t + 1)]) - start[size_t(t)];
      float* p = params[t];
      const float* g = grads[t];
      float* mt = m[t];
      float* vt = v[t];
#pragma omp simd
      for (int64_t i = lo; i < hi; i++) {
        const float gi = g[i] * grad_scale;
        const float mi = b1 * mt[i] + omb1 * gi;
        const float vi = b2 * vt[i] + omb2 * gi * gi;
        mt[i] = mi;
        vt[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) * inv_bc2_sqrt + epsf);
      }
      pos = start[size_t(t)] + hi;
    }
  });
}

}  // namespace mlora::cpu
