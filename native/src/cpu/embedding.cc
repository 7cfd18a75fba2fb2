// Token embedding: forward y[n,h] = table[ids[n]] (table f32, bf16 or f16, converted to f32);
// backward dtable[ids[n]] += dy[n].
// Accumulation: y is written (=); dtable is a parameter gradient and accumulates (+=).
// Token ids are checked on the calling thread before any work starts (an out-of-range id is an
// Error, never an out-of-bounds read), since the ids are data the JS side may change after the
// op was parsed.
#include <cstring>
#include <string>

#include "../kernels.h"

namespace mlora::cpu {

static void check_ids(const int32_t* ids, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw Error("argument 'ids': token id " + std::to_string(ids[i]) + " at row " + std::to_string(i) +
                  " is out of range [0, " + std::to_string(vocab) + ")");
}

void embedding_forward(Exec& ex, float* y, const int32_t* ids, WeightRef table, int64_t n, int64_t vocab, int64_t h) {
  check_ids(ids, n, vocab);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(h, 1));
  ex.pool().parallel_for(n, grain, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; i++) {
      float* yi = y + i * h;
      const int64_t row = int64_t(ids[i]) * h;
      switch (table.dtype) {
        case DType::F32: std::memcpy(yi, static_cast<const float*>(table.ptr) + row, size_t(h) * 4); break;
        case DType::BF16: {
          const uint16_t* src = static_cast<const uint16_t*>(table.ptr) + row;
#pragma omp simd
          for (int64_t j = 0; j < h; j++) {
            uint32_t u = uint32_t(src[j]) << 16;
            float f;
            std::memcpy(&f, &u, 4);
            yi[j] = f;
          }
          break;
        }
        case DType::F16: {
          const uint16_t* src = static_cast<const uint16_t*>(table.ptr) + row;
          for (int64_t j = 0; j < h; j++) yi[j] = f16_to_f32(src[j]);
          break;
        }
        default: break;  // the op parser admits only f32/bf16/f16 tables
      }
    }
  });
}

void embedding_backward(Exec& ex, float* dtable, const float* dy, const int32_t* ids, int64_t n, int64_t vocab,
                        int64_t h) {
  check_ids(ids, n, vocab);
  // Parallel over columns, rows in order inside each thread: repeated token ids never race and
  // the sum order (row order) is the same for any thread count.
  const int64_t grain = std::max<int64_t>(16, 4096 / std::max<int64_t>(n, 1));
  ex.pool().parallel_for(h, grain, [&](int64_t c0, int64_t c1, int) {
    for (int64_t i = 0; i < n; i++) {
      float* dst = dtable + int64_t(ids[i]) * h;
      const float* src = dy + i * h;
#pragma omp simd
      for (int64_t j = c0; j < c1; j++) dst[j] += src[j];
    }
  });
}

}  // namespace mlora::cpu
