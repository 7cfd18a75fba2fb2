// Embedding: y[n,h] = table[ids[n]] (=); backward dtable[ids[n]] += dy[n] (parameter gradient, +=).
// An id outside [0, vocab) is reported by the next synchronize (as the CPU kernel's Error) and
// its row is written as zeros / skipped. The backward is deterministic without atomics: each
// thread owns one column of one residue class of ids (id mod kBuckets) and adds the rows of
// that class in row order.
#include "common.cuh"

namespace mlora::cuda {

namespace {

template <typename L>
__global__ void embedding_forward_kernel(float* y, const int32_t* ids, const typename L::T* table, int64_t n,
                                         int64_t vocab, int64_t h, DeviceError* err) {
  int64_t total = n * h;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = i / h, c = i % h;
    int64_t id = ids[r];
    if (id < 0 || id >= vocab) {
      if (c == 0) report_error(err, kErrEmbeddingId, r, id, vocab);
      y[i] = 0.f;
      continue;
    }
    y[i] = L::load(table, id * h + c);
  }
}

constexpr int kBuckets = 32;

// grid.x covers columns, grid.y the id buckets. Every thread of a warp has the same bucket, so
// the id reads are broadcasts and the dy reads are coalesced.
__global__ void embedding_backward_kernel(float* dtable, const float* dy, const int32_t* ids, int64_t n, int64_t vocab,
                                          int64_t h, DeviceError* err) {
  int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int bucket = blockIdx.y;
  if (c >= h) return;
  for (int64_t r = 0; r < n; r++) {
    int64_t id = ids[r];
    if (id < 0 || id >= vocab) {
      if (c == 0 && bucket == 0) report_error(err, kErrEmbeddingId, r, id, vocab);
      continue;
    }
    if (int(id % kBuckets) != bucket) continue;
    dtable[id * h + c] += dy[r * h + c];
  }
}

}  // namespace

void embedding_forward(Exec& ex, float* y, const int32_t* ids, WeightRef table, int64_t n, int64_t vocab, int64_t h) {
  if (n <= 0 || h <= 0) return;
  cudaStream_t s = enter(ex);
  DeviceError* err = backend_of(ex).device_error();
  with_weight_loader(table, "embedding_forward", [&](auto loader, auto ptr) {
    using L = decltype(loader);
    embedding_forward_kernel<L><<<grid_for(n * h, 256), 256, 0, s>>>(y, ids, ptr, n, vocab, h, err);
  });
  check_launch("embedding_forward_kernel");
}

void embedding_backward(Exec& ex, float* dtable, const float* dy, const int32_t* ids, int64_t n, int64_t vocab,
                        int64_t h) {
  if (n <= 0 || h <= 0) return;
  cudaStream_t s = enter(ex);
  dim3 grid(unsigned((h + 127) / 128), kBuckets);
  embedding_backward_kernel<<<grid, 128, 0, s>>>(dtable, dy, ids, n, vocab, h, backend_of(ex).device_error());
  check_launch("embedding_backward_kernel");
}

}  // namespace mlora::cuda
