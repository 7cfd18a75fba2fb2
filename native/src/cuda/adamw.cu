// AdamW with PyTorch semantics (torch.optim.AdamW, foreach=False, non-capturable):
//   p *= 1 - lr·wd;  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²;
//   p -= (lr / (1-β1^t)) · m / (sqrt(v) / sqrt(1-β2^t) + eps),   g = grad·grad_scale.
// Every tensor of one call in one launch: a device table of {param, grad, m, v, n} and the
// first block of each tensor; each block updates one chunk of one tensor. step is 1-based.
// Accumulation: params, m and v are updated in place; grads are read only.
#include <cmath>
#include <vector>

#include "common.cuh"

namespace mlora::cuda {

namespace {

struct AdamSlot {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t n;
  int64_t first_block;
};

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamSlot* slots, int64_t count, float beta1, float omb1, float beta2, float omb2, float eps,
                 float decay, float step_size, float bc2_sqrt, float grad_scale) {
  int64_t b = blockIdx.x;
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (slots[mid].first_block <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  AdamSlot t = slots[lo];
  int64_t start = (b - t.first_block) * kChunk, end = min(t.n, start + kChunk);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float g = t.g[i] * grad_scale;
    float p = t.p[i] * decay;
    float m = beta1 * t.m[i] + omb1 * g;
    float v = beta2 * t.v[i] + omb2 * g * g;
    float denom = sqrtf(v) / bc2_sqrt + eps;
    t.p[i] = p - step_size * (m / denom);
    t.m[i] = m;
    t.v[i] = v;
  }
}

}  // namespace

void adamw(Exec& ex, float* const* params, const float* const* grads, float* const* m, float* const* v,
           const int64_t* ns, int64_t count, double lr, double beta1, double beta2, double eps, double weight_decay,
           int64_t step, float grad_scale) {
  if (step < 1) throw Error("adamw: step must be >= 1 (1-based), got " + std::to_string(step));
  std::vector<AdamSlot> slots;
  int64_t blocks = 0;
  for (int64_t t = 0; t < count; t++) {
    if (ns[t] <= 0) continue;
    slots.push_back(AdamSlot{params[t], grads[t], m[t], v[t], ns[t], blocks});
    blocks += (ns[t] + kChunk - 1) / kChunk;
  }
  if (blocks == 0) return;
  if (blocks > INT32_MAX) throw Error("adamw: too many elements for one call");
  cudaStream_t s = enter(ex);
  Scratch table(ex, slots.size() * sizeof(AdamSlot));
  upload(ex, table.as<void>(), slots.data(), slots.size() * sizeof(AdamSlot));
  // Bias corrections in double on the host, as PyTorch computes them from a Python float.
  double bc1 = 1.0 - std::pow(double(beta1), double(step));
  double bc2 = 1.0 - std::pow(double(beta2), double(step));
  float step_size = float(double(lr) / bc1);
  float bc2_sqrt = float(std::sqrt(bc2));
  float decay = float(1.0 - lr * weight_decay);
  adamw_kernel<<<unsigned(blocks), kThreads, 0, s>>>(table.as<AdamSlot>(), int64_t(slots.size()), float(beta1),
                                                     float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
                                                     decay, step_size, bc2_sqrt, grad_scale);
  check_launch("adamw_kernel");
}

}  // namespace mlora::cuda
