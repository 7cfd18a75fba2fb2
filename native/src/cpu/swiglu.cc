// SwiGLU activation of the LLaMA MLP: h = silu(gate)·up, silu(g) = g·σ(g).
// Backward (written =, both are activation gradients):
//   dup   = dh·silu(g)
//   dgate = dh·up·σ(g)·(1 + g·(1 − σ(g)))
// Elementwise, so exact aliasing (h over gate or up; dgate over gate or dh, dup over up) is safe:
// every element's inputs are read before its outputs are written. σ uses the vectorisable
// exp_approx (relative error ≈ 2e-7), so results are within a few float ulps of libm's.
//
// Speed: the loops are compiled three times (AVX-512, AVX2+FMA, baseline SSE2) and picked per
// call like the tile kernels (simd::pick_isa, MLORA_GEMM_KERNEL): the exp polynomial is most
// of the work, and 16 lanes do it four times faster than SSE2's 4.
#include <algorithm>

#include "../kernels.h"
#include "simd.h"
#include "vmath.h"

namespace mlora::cpu {

namespace {

constexpr int64_t kGrain = 1 << 14;

__attribute__((always_inline)) inline void forward_range(float* h, const float* gate, const float* up, int64_t b,
                                                         int64_t e) {
#pragma omp simd
  for (int64_t i = b; i < e; i++) {
    const float g = gate[i];
    h[i] = g * sigmoid_approx(g) * up[i];
  }
}

__attribute__((always_inline)) inline void backward_range(float* dgate, float* dup, const float* dh, const float* gate,
                                                          const float* up, int64_t b, int64_t e) {
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
}

using Fwd = void (*)(float*, const float*, const float*, int64_t, int64_t);
using Bwd = void (*)(float*, float*, const float*, const float*, const float*, int64_t, int64_t);

void fwd_portable(float* h, const float* g, const float* u, int64_t b, int64_t e) { forward_range(h, g, u, b, e); }
void bwd_portable(float* dg, float* du, const float* dh, const float* g, const float* u, int64_t b, int64_t e) {
  backward_range(dg, du, dh, g, u, b, e);
}
#ifdef MLORA_SIMD_X86
MLORA_TT_AVX2 void fwd_avx2(float* h, const float* g, const float* u, int64_t b, int64_t e) {
  forward_range(h, g, u, b, e);
}
MLORA_TT_AVX2 void bwd_avx2(float* dg, float* du, const float* dh, const float* g, const float* u, int64_t b,
                            int64_t e) {
  backward_range(dg, du, dh, g, u, b, e);
}
MLORA_TT_AVX512 void fwd_avx512(float* h, const float* g, const float* u, int64_t b, int64_t e) {
  forward_range(h, g, u, b, e);
}
MLORA_TT_AVX512 void bwd_avx512(float* dg, float* du, const float* dh, const float* g, const float* u, int64_t b,
                                int64_t e) {
  backward_range(dg, du, dh, g, u, b, e);
}
#endif

}  // namespace

void swiglu_forward(Exec& ex, float* h, const float* gate, const float* up, int64_t n) {
  const Fwd f = MLORA_SIMD_PICK(fwd);
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) { f(h, gate, up, b, e); });
}

void swiglu_backward(Exec& ex, float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                     int64_t n) {
  const Bwd f = MLORA_SIMD_PICK(bwd);
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) { f(dgate, dup, dh, gate, up, b, e); });
}

}  // namespace mlora::cpu
