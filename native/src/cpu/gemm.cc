// GEMM: C = alpha·op(A)·op(B) + beta·C, row-major, B in f32/f16/bf16 (base weights).
// Placeholder implementation: correct, blocked, parallel over rows; the packed AVX2/AVX-512
// micro-kernel version replaces its inside without changing the signature.
#include <algorithm>
#include <vector>

#include "../kernels.h"
#include "cpu_features.h"

namespace mlora {

const char* cpu_gemm_kernel_name() { return "generic"; }

namespace cpu {

void gemm(Exec& ex, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, WeightRef b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const int64_t KC = 256;
  std::vector<float> bp(size_t(std::min<int64_t>(KC, std::max<int64_t>(k, 1)) * n));
  ex.pool().parallel_for(m, 4, [&](int64_t r0, int64_t r1, int) {
    for (int64_t i = r0; i < r1; i++) {
      float* ci = c + i * ldc;
      if (beta == 0.f) std::fill(ci, ci + n, 0.f);
      else if (beta != 1.f) for (int64_t j = 0; j < n; j++) ci[j] *= beta;
    }
  });
  for (int64_t k0 = 0; k0 < k; k0 += KC) {
    int64_t kc = std::min(KC, k - k0);
    // bp[kk, j] = op(B)[k0 + kk, j] in f32
    ex.pool().parallel_for(kc, 1, [&](int64_t q0, int64_t q1, int) {
      for (int64_t kk = q0; kk < q1; kk++)
        for (int64_t j = 0; j < n; j++)
          bp[size_t(kk * n + j)] = trans_b ? b.at(j * ldb + k0 + kk) : b.at((k0 + kk) * ldb + j);
    });
    ex.pool().parallel_for(m, 4, [&](int64_t r0, int64_t r1, int) {
      for (int64_t i = r0; i < r1; i++) {
        float* ci = c + i * ldc;
        for (int64_t kk = 0; kk < kc; kk++) {
          float av = alpha * (trans_a ? a[(k0 + kk) * lda + i] : a[i * lda + k0 + kk]);
          const float* bk = bp.data() + kk * n;
#pragma omp simd
          for (int64_t j = 0; j < n; j++) ci[j] += av * bk[j];
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace mlora
