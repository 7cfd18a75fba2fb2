// RMSNorm: y = x·rstd·w with rstd = 1/sqrt(mean(x²) + eps), saved per row for backward.
// Backward: dx (=, or += with accumulate) = rstd·(w·dy - x·rstd²·mean(w·dy·x));
// dw (+=, optional: nullptr skips it) = Σ_rows dy·x·rstd, summed deterministically: fixed
// chunks of rows per partial, partials added in chunk order (no atomics).
#include "common.cuh"

namespace mlora::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerPartial = 64;

template <typename L>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_forward_kernel(float* y, float* rstd, const float* x, const typename L::T* w, int64_t h, float eps) {
  __shared__ float sh[32];
  int64_t row = blockIdx.x;
  const float* xr = x + row * h;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) ss = fmaf(xr[j], xr[j], ss);
  ss = block_sum(ss, sh);
  float r = 1.f / sqrtf(ss / float(h) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  float* yr = y + row * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) yr[j] = xr[j] * r * L::load(w, j);
}

template <typename L>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_backward_kernel(float* dx, const float* dy, const float* x, const typename L::T* w, const float* rstd,
                            int64_t h, bool accumulate) {
  __shared__ float sh[32];
  int64_t row = blockIdx.x;
  const float *xr = x + row * h, *dyr = dy + row * h;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) dot = fmaf(dyr[j] * L::load(w, j), xr[j], dot);
  dot = block_sum(dot, sh);
  float r = rstd[row];
  float k = r * r * dot / float(h);
  float* dxr = dx + row * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    float g = r * (L::load(w, j) * dyr[j] - xr[j] * k);
    dxr[j] = accumulate ? dxr[j] + g : g;
  }
}

// partial[chunk, j] = Σ_{rows of chunk} dy·x·rstd
__global__ void rmsnorm_dw_partial_kernel(float* partial, const float* dy, const float* x, const float* rstd, int64_t n,
                                          int64_t h) {
  int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  int64_t r0 = int64_t(blockIdx.y) * kRowsPerPartial, r1 = min(n, r0 + kRowsPerPartial);
  float s = 0.f;
  for (int64_t r = r0; r < r1; r++) s = fmaf(dy[r * h + j] * x[r * h + j], rstd[r], s);
  partial[int64_t(blockIdx.y) * h + j] = s;
}

__global__ void rmsnorm_dw_final_kernel(float* dw, const float* partial, int64_t chunks, int64_t h) {
  int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; c++) s += partial[c * h + j];
  dw[j] += s;
}

}  // namespace

void rmsnorm_forward(Exec& ex, float* y, float* rstd, const float* x, WeightRef w, int64_t n, int64_t h, float eps) {
  if (n <= 0 || h <= 0) return;
  cudaStream_t s = enter(ex);
  if (n > INT32_MAX) throw Error("rmsnorm_forward: too many rows");
  with_weight_loader(w, "rmsnorm_forward", [&](auto loader, auto ptr) {
    rmsnorm_forward_kernel<decltype(loader)><<<unsigned(n), kThreads, 0, s>>>(y, rstd, x, ptr, h, eps);
  });
  check_launch("rmsnorm_forward_kernel");
}

void rmsnorm_backward(Exec& ex, float* dx, float* dw, const float* dy, const float* x, WeightRef w, const float* rstd,
                      int64_t n, int64_t h, bool accumulate) {
  if (n <= 0 || h <= 0) return;
  cudaStream_t s = enter(ex);
  if (n > INT32_MAX) throw Error("rmsnorm_backward: too many rows");
  if (dw) {  // before dx: dx may be written in place over dy
    int64_t chunks = (n + kRowsPerPartial - 1) / kRowsPerPartial;
    Scratch partial(ex, size_t(chunks * h) * sizeof(float));
    dim3 grid(unsigned((h + 127) / 128), unsigned(chunks));
    rmsnorm_dw_partial_kernel<<<grid, 128, 0, s>>>(partial.as<float>(), dy, x, rstd, n, h);
    check_launch("rmsnorm_dw_partial_kernel");
    rmsnorm_dw_final_kernel<<<unsigned((h + 255) / 256), 256, 0, s>>>(dw, partial.as<float>(), chunks, h);
    check_launch("rmsnorm_dw_final_kernel");
  }
  with_weight_loader(w, "rmsnorm_backward", [&](auto loader, auto ptr) {
    rmsnorm_backward_kernel<decltype(loader)><<<unsigned(n), kThreads, 0, s>>>(dx, dy, x, ptr, rstd, h, accumulate);
  });
  check_launch("rmsnorm_backward_kernel");
}

}  // namespace mlora::cuda
