// Frozen base linear layer: forward Y = X·Wᵀ, backward dX = dY·W, never dW.
// Accumulation: dx and y are written (=), or added to (+=) with `accumulate` (residual stream,
// or the LoRA path adding into the base path's dX). Both are one GEMM (cuBLAS or the fallback).
#include "common.cuh"

namespace mlora::cuda {

void linear_forward(Exec& ex, float* y, const float* x, WeightRef w, int64_t m, int64_t n, int64_t k, bool accumulate) {
  gemm(ex, false, true, m, n, k, 1.f, x, k, w, k, accumulate ? 1.f : 0.f, y, n);
}

void linear_backward(Exec& ex, float* dx, const float* dy, WeightRef w, int64_t m, int64_t n, int64_t k,
                     bool accumulate) {
  gemm(ex, false, false, m, k, n, 1.f, dy, n, w, k, accumulate ? 1.f : 0.f, dx, k);
}

}  // namespace mlora::cuda
