// RMSNorm (LLaMA): y = x · rstd · w, rstd = 1 / sqrt(mean(x²) + eps), per row of h elements.
// Forward saves rstd[n] for backward. w may be f32, bf16 or f16 (converted once per call).
// Backward, with r = rstd and c = (1/h)·Σ_j dy_j·w_j·x_j:
//   dx_i = r·w_i·dy_i − r³·x_i·c           (written =, or += with `accumulate`: the residual stream)
//   dw_i += Σ_rows dy_i·x_i·r              (parameter gradient, +=, optional)
// Precision: the row sums Σx² and Σ dy·w·x are accumulated in double (simd lanes: 2, 4 or 8)
// and rstd is computed in double, then rounded to float once; everything elementwise is float.
// Speed: the row loops are compiled for AVX-512, AVX2+FMA and baseline SSE2 and picked per call
// like swiglu's (simd::pick_isa, MLORA_GEMM_KERNEL); the row sums' lane order, and so their
// last bits, differ between the paths.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"
#include "simd.h"

namespace mlora::cpu {

// w as f32 (a pointer into w itself when it already is f32, else a per-thread scratch copy).
static const float* weight_f32(const WeightRef& w, int64_t h) {
  if (w.dtype == DType::F32) return static_cast<const float*>(w.ptr);
  thread_local std::vector<float> scratch;
  if (int64_t(scratch.size()) < h) scratch.resize(size_t(h));
  for (int64_t j = 0; j < h; j++) scratch[size_t(j)] = w.at(j);
  return scratch.data();
}

namespace {

// Rows [b, e): y = x·rstd·w, rstd saved.
__attribute__((always_inline)) inline void forward_rows(float* y, float* rstd, const float* x, const float* wf,
                                                        int64_t b, int64_t e, int64_t h, float eps) {
  for (int64_t i = b; i < e; i++) {
    const float* xi = x + i * h;
    float* yi = y + i * h;
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < h; j++) ss += double(xi[j]) * double(xi[j]);
    const float r = float(1.0 / std::sqrt(ss / double(h) + double(eps)));
    rstd[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < h; j++) yi[j] = xi[j] * r * wf[j];
  }
}

// Rows [b, e): dx (=, or += with accumulate) = r·w·dy − r³·x·(1/h)·Σ dy·w·x.
__attribute__((always_inline)) inline void backward_rows(float* dx, const float* dy, const float* x, const float* wf,
                                                         const float* rstd, int64_t b, int64_t e, int64_t h,
                                                         bool accumulate) {
  for (int64_t i = b; i < e; i++) {
    const float* xi = x + i * h;
    const float* dyi = dy + i * h;
    float* dxi = dx + i * h;
    const float r = rstd[i];
    double dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < h; j++) dot += double(dyi[j]) * double(wf[j]) * double(xi[j]);
    const float k = float(double(r) * double(r) * double(r) * dot / double(h));
    if (accumulate) {
#pragma omp simd
      for (int64_t j = 0; j < h; j++) dxi[j] += r * wf[j] * dyi[j] - k * xi[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < h; j++) dxi[j] = r * wf[j] * dyi[j] - k * xi[j];
    }
  }
}

using Fwd = void (*)(float*, float*, const float*, const float*, int64_t, int64_t, int64_t, float);
using Bwd = void (*)(float*, const float*, const float*, const float*, const float*, int64_t, int64_t, int64_t, bool);

#define MLORA_RMSNORM_ROWS(SUFFIX, TARGET)                                                                         \
  TARGET void fwd_##SUFFIX(float* y, float* rs, const float* x, const float* w, int64_t b, int64_t e, int64_t h,   \
                           float eps) {                                                                            \
    forward_rows(y, rs, x, w, b, e, h, eps);                                                                       \
  }                                                                                                                \
  TARGET void bwd_##SUFFIX(float* dx, const float* dy, const float* x, const float* w, const float* rs, int64_t b, \
                           int64_t e, int64_t h, bool acc) {                                                       \
    backward_rows(dx, dy, x, w, rs, b, e, h, acc);                                                                 \
  }
MLORA_RMSNORM_ROWS(portable, )
#ifdef MLORA_SIMD_X86
MLORA_RMSNORM_ROWS(avx2, MLORA_TT_AVX2)
MLORA_RMSNORM_ROWS(avx512, MLORA_TT_AVX512)
#endif
#undef MLORA_RMSNORM_ROWS

}  // namespace

void rmsnorm_forward(Exec& ex, float* y, float* rstd, const float* x, WeightRef w, int64_t n, int64_t h, float eps) {
  const float* wf = weight_f32(w, h);
  const Fwd f = MLORA_SIMD_PICK(fwd);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(h, 1));
  ex.pool().parallel_for(n, grain, [&](int64_t b, int64_t e, int) { f(y, rstd, x, wf, b, e, h, eps); });
}

void rmsnorm_backward(Exec& ex, float* dx, float* dw, const float* dy, const float* x, WeightRef w, const float* rstd,
                      int64_t n, int64_t h, bool accumulate) {
  const float* wf = weight_f32(w, h);
  const Bwd f = MLORA_SIMD_PICK(bwd);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(h, 1));
  ex.pool().parallel_for(n, grain, [&](int64_t b, int64_t e, int) { f(dx, dy, x, wf, rstd, b, e, h, accumulate); });
  if (!dw) return;
  // dw: parallel over columns, rows summed in order, so no two threads touch one element and
  // the result does not depend on the thread count.
  const int64_t cgrain = std::max<int64_t>(16, 8192 / std::max<int64_t>(n, 1));
  ex.pool().parallel_for(h, cgrain, [&](int64_t c0, int64_t c1, int) {
    const int64_t CB = 256;
    float acc[CB];
    for (int64_t cb = c0; cb < c1; cb += CB) {
      const int64_t ce = std::min(c1, cb + CB), len = ce - cb;
      std::fill(acc, acc + len, 0.f);
      for (int64_t i = 0; i < n; i++) {
        const float* xi = x + i * h + cb;
        const float* dyi = dy + i * h + cb;
        const float r = rstd[i];
#pragma omp simd
        for (int64_t j = 0; j < len; j++) acc[j] += dyi[j] * xi[j] * r;
      }
      for (int64_t j = 0; j < len; j++) dw[cb + j] += acc[j];
    }
  });
}

}  // namespace mlora::cpu
