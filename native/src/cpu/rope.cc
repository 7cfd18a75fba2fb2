// Rotary position embedding, Hugging Face LLaMA `rotate_half` convention. For one head vector
// x of size d (half = d/2) at position p:
//   y[i]      = x[i]·cos[p,i] − x[i+half]·sin[p,i]
//   y[i+half] = x[i+half]·cos[p,i] + x[i]·sin[p,i]        (i < half)
// The backward pass is the inverse rotation (angle −θ) applied to dy.
// Accumulation: y and dx are activations and are written (=). In place is allowed (y == x,
// dx == dy): each element pair (i, i+half) is read before it is written.
#include <string>

#include "../kernels.h"

namespace mlora::cpu {

namespace {

// Runs on the calling thread before any worker starts, so the Error reaches JavaScript
// (an exception escaping a pool worker would end the process).
void check_positions(const int32_t* pos, int64_t n, int64_t max_pos) {
  for (int64_t r = 0; r < n; r++)
    if (pos[r] < 0 || pos[r] >= max_pos)
      throw Error("argument 'pos': position " + std::to_string(pos[r]) + " at row " + std::to_string(r) +
                  " is outside the cos/sin table [0, " + std::to_string(max_pos) + ")");
}

// sign = +1: forward rotation; sign = −1: inverse rotation.
void rotate(Exec& ex, float* y, const float* x, const int32_t* pos, const float* cos_t, const float* sin_t, int64_t n,
            int64_t heads, int64_t head_dim, int64_t max_pos, float sign) {
  check_positions(pos, n, max_pos);
  const int64_t half = head_dim / 2, row = heads * head_dim;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row));
  ex.pool().parallel_for(n, grain, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; r++) {
      const float* c = cos_t + int64_t(pos[r]) * half;
      const float* s = sin_t + int64_t(pos[r]) * half;
      for (int64_t h = 0; h < heads; h++) {
        const float* xa = x + r * row + h * head_dim;
        float* ya = y + r * row + h * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < half; i++) {
          float a = xa[i], b = xa[i + half], si = sign * s[i];
          ya[i] = a * c[i] - b * si;
          ya[i + half] = b * c[i] + a * si;
        }
      }
    }
  });
}

}  // namespace

void rope_forward(Exec& ex, float* y, const float* x, const int32_t* pos, const float* cos_t, const float* sin_t,
                  int64_t n, int64_t heads, int64_t head_dim, int64_t max_pos) {
  rotate(ex, y, x, pos, cos_t, sin_t, n, heads, head_dim, max_pos, 1.f);
}

void rope_backward(Exec& ex, float* dx, const float* dy, const int32_t* pos, const float* cos_t, const float* sin_t,
                   int64_t n, int64_t heads, int64_t head_dim, int64_t max_pos) {
  rotate(ex, dx, dy, pos, cos_t, sin_t, n, heads, head_dim, max_pos, -1.f);
}

}  // namespace mlora::cpu
