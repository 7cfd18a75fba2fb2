// SwiGLU activation of the LLaMA MLP: h = silu(gate)·up, silu(g) = g·σ(g).
// Backward (written =, both are activation gradients):
//   dup   = dh·silu(g)
//   dgate = dh·up·σ(g)·(1 + g·(1 − σ(g)))
// Elementwise, so exact aliasing (h over gate or up; dgate over gate or dh, dup over up) is safe:
// every element's inputs are read before its outputs are written. σ uses the vectorisable
// exp_approx (relative error ≈ 2e-7), so results are within a few float ulps of libm's.
#include <algorithm>

#include "../kernels.h"
#include "vmath.h"

namespace mlora::cpu {

static constexpr int64_t kGrain = 1 << 14;

void swiglu_forward(Exec& ex, float* h, const float* gate, const float* up, int64_t n) {
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; i++) {
      const float g = gate[i];
      h[i] = g * sigmoid_approx(g) * up[i];
    }
  });
}

void swiglu_backward(Exec& ex, float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                     int64_t n) {
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; i++) {
      const float g = gate[i], u = up[i], d = dh[i];
      const float s = sigmoid_approx(g);
      // silu(g) = g·σ and k = σ·(1 + g(1−σ)) are bounded (|k| < 1.1), so grouping them first
      // keeps an intermediate from overflowing when dh·up is large.
      const float k = s * (1.f + g * (1.f - s));
      dup[i] = d * (g * s);
      dgate[i] = d * (u * k);
    }
  });
}

}  // namespace mlora::cpu
