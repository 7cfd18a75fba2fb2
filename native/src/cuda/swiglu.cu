// SwiGLU: h = silu(gate)·up, silu(g) = g·σ(g). Backward writes dgate and dup (=):
// dup = dh·silu(g), dgate = dh·up·σ(g)·(1 + g·(1 - σ(g))).
#include "common.cuh"

namespace mlora::cuda {

namespace {

__device__ __forceinline__ float sigmoidf(float g) { return 1.f / (1.f + expf(-g)); }

__global__ void swiglu_forward_kernel(float* h, const float* gate, const float* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float g = gate[i];
    h[i] = g * sigmoidf(g) * up[i];
  }
}

__global__ void swiglu_backward_kernel(float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                                       int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float g = gate[i], u = up[i], d = dh[i];  // read everything first: outputs may alias inputs
    float sg = sigmoidf(g);
    dup[i] = d * g * sg;
    dgate[i] = d * u * sg * (1.f + g * (1.f - sg));
  }
}

}  // namespace

void swiglu_forward(Exec& ex, float* h, const float* gate, const float* up, int64_t n) {
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  swiglu_forward_kernel<<<grid_for(n, 256), 256, 0, s>>>(h, gate, up, n);
  check_launch("swiglu_forward_kernel");
}

void swiglu_backward(Exec& ex, float* dgate, float* dup, const float* dh, const float* gate, const float* up,
                     int64_t n) {
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  swiglu_backward_kernel<<<grid_for(n, 256), 256, 0, s>>>(dgate, dup, dh, gate, up, n);
  check_launch("swiglu_backward_kernel");
}

}  // namespace mlora::cuda
