// Rotary embedding, HF rotate_half convention, on x[n, heads, head_dim] (y may equal x):
// with d2 = head_dim/2 and (c, s) = (cos, sin)[pos[row], i], for i < d2
//   y[i] = x[i]·c - x[i+d2]·s,   y[i+d2] = x[i+d2]·c + x[i]·s.
// Backward is the inverse rotation (dx written, =). One thread owns the pair (i, i+d2), so
// in place is safe. A position outside the table is reported by the next synchronize.
#include "common.cuh"

namespace mlora::cuda {

namespace {

template <bool BACKWARD>
__global__ void rope_kernel(float* y, const float* x, const int32_t* pos, const float* cos_t, const float* sin_t,
                            int64_t n, int64_t heads, int64_t head_dim, int64_t max_pos, DeviceError* err) {
  int64_t d2 = head_dim / 2;
  int64_t total = n * heads * d2;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = t % d2, rh = t / d2, row = rh / heads;
    int64_t base = rh * head_dim;
    int64_t p = pos[row];
    float x0 = x[base + i], x1 = x[base + i + d2];
    if (p < 0 || p >= max_pos) {
      if (t % (heads * d2) == 0) report_error(err, kErrRopePos, row, p, max_pos);
      y[base + i] = 0.f;
      y[base + i + d2] = 0.f;
      continue;
    }
    float c = cos_t[p * d2 + i], s = sin_t[p * d2 + i];
    if (BACKWARD) {
      y[base + i] = x0 * c + x1 * s;
      y[base + i + d2] = x1 * c - x0 * s;
    } else {
      y[base + i] = x0 * c - x1 * s;
      y[base + i + d2] = x1 * c + x0 * s;
    }
  }
}

void rope(Exec& ex, bool backward, float* y, const float* x, const int32_t* pos, const float* cos_t, const float* sin_t,
          int64_t n, int64_t heads, int64_t head_dim, int64_t max_pos) {
  if (head_dim % 2 != 0) throw Error("rope: head_dim must be even, got " + std::to_string(head_dim));
  int64_t total = n * heads * (head_dim / 2);
  if (total <= 0) return;
  cudaStream_t s = enter(ex);
  DeviceError* err = backend_of(ex).device_error();
  if (backward)
    rope_kernel<true><<<grid_for(total, 256), 256, 0, s>>>(y, x, pos, cos_t, sin_t, n, heads, head_dim, max_pos, err);
  else
    rope_kernel<false><<<grid_for(total, 256), 256, 0, s>>>(y, x, pos, cos_t, sin_t, n, heads, head_dim, max_pos, err);
  check_launch("rope_kernel");
}

}  // namespace

void rope_forward(Exec& ex, float* y, const float* x, const int32_t* pos, const float* cos_t, const float* sin_t,
                  int64_t n, int64_t heads, int64_t head_dim, int64_t max_pos) {
  rope(ex, false, y, x, pos, cos_t, sin_t, n, heads, head_dim, max_pos);
}

void rope_backward(Exec& ex, float* dx, const float* dy, const int32_t* pos, const float* cos_t, const float* sin_t,
                   int64_t n, int64_t heads, int64_t head_dim, int64_t max_pos) {
  rope(ex, true, dx, dy, pos, cos_t, sin_t, n, heads, head_dim, max_pos);
}

}  // namespace mlora::cuda
