// Cross-entropy over the vocabulary, one block per row: loss = logsumexp(logits) - logits[label]
// (0 where label < 0, i.e. -100 = ignore). The backward variant is fused: it also writes
// dlogits = weight[row]·(softmax - onehot) (zeros for ignored rows; weights == nullptr means 1),
// in place over logits allowed: each element is read, then written, by the same thread, after
// the row's max and sum are known. A label ≥ vocab is reported by the next synchronize.
// Accumulation: losses and dlogits are written (=).
#include "common.cuh"

namespace mlora::cuda {

namespace {

constexpr int kThreads = 512;

// Online (max, sum of exp) pair, merged exactly as the single-pass softmax does.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? 0.f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mn));
  m = mn;
}

template <bool GRAD>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(float* losses, float* dlogits, const float* logits, const int32_t* labels,
                         const float* weights, int64_t vocab, DeviceError* err) {
  __shared__ float shm[32], shs[32];
  int64_t row = blockIdx.x;
  const float* x = logits + row * vocab;
  int64_t label = labels[row];
  bool bad = label >= vocab;
  bool ignored = label < 0 || bad;
  float xl = ignored ? 0.f : x[label];  // read before any thread writes dlogits in place
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float v = x[j];
    if (v > m) {
      s = (m == -INFINITY ? 0.f : s * expf(m - v)) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
    shm[warp] = m;
    shs[warp] = s;
  }
  __syncthreads();
  m = lane < nw ? shm[lane] : -INFINITY;
  s = lane < nw ? shs[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  float lse = m + logf(s);
  if (threadIdx.x == 0) {
    if (bad) report_error(err, kErrLabel, row, label, vocab);
    losses[row] = ignored ? 0.f : lse - xl;
  }
  if (GRAD) {
    float w = ignored ? 0.f : (weights ? weights[row] : 1.f);
    float* d = dlogits + row * vocab;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      float p = expf(x[j] - lse);
      d[j] = w * (p - (j == label ? 1.f : 0.f));
    }
  }
}

}  // namespace

void cross_entropy_forward(Exec& ex, float* losses, const float* logits, const int32_t* labels, int64_t n,
                           int64_t vocab) {
  if (n <= 0) return;
  if (n > INT32_MAX) throw Error("cross_entropy_forward: too many rows");
  cudaStream_t s = enter(ex);
  cross_entropy_kernel<false>
      <<<unsigned(n), kThreads, 0, s>>>(losses, nullptr, logits, labels, nullptr, vocab, backend_of(ex).device_error());
  check_launch("cross_entropy_kernel");
}

void cross_entropy_backward(Exec& ex, float* losses, float* dlogits, const float* logits, const int32_t* labels,
                            const float* weights, int64_t n, int64_t vocab) {
  if (n <= 0) return;
  if (n > INT32_MAX) throw Error("cross_entropy_backward: too many rows");
  cudaStream_t s = enter(ex);
  cross_entropy_kernel<true>
      <<<unsigned(n), kThreads, 0, s>>>(losses, dlogits, logits, labels, weights, vocab, backend_of(ex).device_error());
  check_launch("cross_entropy_kernel");
}

}  // namespace mlora::cuda
