// Small elementwise helpers. Accumulation: sumsq, axpy and add_bias accumulate (+=), the rest write (=).
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"

namespace mlora::cpu {

static constexpr int64_t kGrain = 1 << 14;

void fill(Exec& ex, float* y, int64_t n, float value) {
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) y[i] = value;
  });
}

void copy_cast(Exec& ex, void* y, DType ydt, const void* x, DType xdt, int64_t n) {
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) {
    if (ydt == xdt) {
      size_t es = dtype_size(ydt);
      std::memmove(static_cast<char*>(y) + b * es, static_cast<const char*>(x) + b * es, size_t(e - b) * es);
      return;
    }
    WeightRef src{x, xdt};
    for (int64_t i = b; i < e; i++) {
      float v = xdt == DType::I32 ? float(static_cast<const int32_t*>(x)[i]) : src.at(i);
      switch (ydt) {
        case DType::F32: static_cast<float*>(y)[i] = v; break;
        case DType::BF16: static_cast<uint16_t*>(y)[i] = f32_to_bf16(v); break;
        case DType::F16: static_cast<uint16_t*>(y)[i] = f32_to_f16(v); break;
        case DType::I32: static_cast<int32_t*>(y)[i] = int32_t(std::lrint(v)); break;
        default: break;  // quantized dtypes never reach here (ops/util.cc allows float ones only)
      }
    }
  });
}

void axpy(Exec& ex, float* y, const float* x, int64_t n, float alpha) {
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; i++) y[i] += alpha * x[i];
  });
}

// Rows are independent; the bias row is read in its stored dtype (f32/bf16/f16).
void add_bias(Exec& ex, float* y, WeightRef b, int64_t n, int64_t m) {
  std::vector<float> bf(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; j++) bf[size_t(j)] = b.at(j);
  const float* bp = bf.data();
  ex.pool().parallel_for(n, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, m)), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; r++) {
      float* yr = y + r * m;
#pragma omp simd
      for (int64_t j = 0; j < m; j++) yr[j] += bp[j];
    }
  });
}

void scale(Exec& ex, float* y, int64_t n, float alpha) {
  ex.pool().parallel_for(n, kGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; i++) y[i] *= alpha;
  });
}

void sumsq(Exec&, float* out, const float* const* xs, const int64_t* ns, int64_t count) {
  double total = 0;  // double: gradient norms over millions of elements
  for (int64_t t = 0; t < count; t++) {
    const float* x = xs[t];
    int64_t n = ns[t];
    for (int64_t b = 0; b < n; b += 4096) {
      int64_t e = std::min<int64_t>(n, b + 4096);
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = b; i < e; i++) s += x[i] * x[i];
      total += double(s);
    }
  }
  out[0] += float(total);
}

void nonfinite(Exec&, float* out, const float* x, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i++) bad += !std::isfinite(x[i]);
  out[0] = float(bad);
}

}  // namespace mlora::cpu
