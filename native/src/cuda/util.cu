// Small elementwise helpers. Accumulation: sumsq, axpy and add_bias accumulate (+=), the rest write (=).
// sumsq is deterministic: fixed-size chunks reduced in a fixed tree, partials summed in a
// fixed order in double (no atomics), so a replayed step clips gradients identically.
#include <vector>

#include "common.cuh"

namespace mlora::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void fill_kernel(float* y, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = v;
}

__device__ __forceinline__ float load_any(const void* x, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(x)[i];
    case DType::BF16: return bf16_bits_to_f32(static_cast<const uint16_t*>(x)[i]);
    case DType::F16: return f16_bits_to_f32(static_cast<const uint16_t*>(x)[i]);
    case DType::I32: return float(static_cast<const int32_t*>(x)[i]);
  }
  return 0.f;
}

__global__ void cast_kernel(void* y, DType yt, const void* x, DType xt, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = load_any(x, xt, i);
    switch (yt) {
      case DType::F32: static_cast<float*>(y)[i] = v; break;
      case DType::BF16: static_cast<uint16_t*>(y)[i] = f32_to_bf16_bits(v); break;
      case DType::F16: static_cast<uint16_t*>(y)[i] = f32_to_f16_bits(v); break;
      case DType::I32: static_cast<int32_t*>(y)[i] = __float2int_rn(v); break;  // lrint: nearest even
    }
  }
}

__global__ void axpy_kernel(float* y, const float* x, int64_t n, float alpha) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += alpha * x[i];
}

template <typename L>
__global__ void add_bias_kernel(float* y, const typename L::T* b, int64_t n, int64_t m) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * m; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += L::load(b, i % m);
}

__global__ void scale_kernel(float* y, int64_t n, float alpha) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] *= alpha;
}

constexpr int64_t kSumChunk = 4096;

// One block per chunk of kSumChunk elements of one tensor; block b finds its tensor in the
// prefix array first_block[] (count+1 entries) by binary search.
__global__ void sumsq_partial_kernel(double* partial, const float* const* xs, const int64_t* ns,
                                     const int64_t* first_block, int64_t count) {
  __shared__ float sh[32];
  int64_t b = blockIdx.x;
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {  // the last t with first_block[t] <= b
    int64_t mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  const float* x = xs[lo];
  int64_t start = (b - first_block[lo]) * kSumChunk, end = min(ns[lo], start + kSumChunk);
  float s = 0.f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) s = fmaf(x[i], x[i], s);
  s = block_sum(s, sh);
  if (threadIdx.x == 0) partial[b] = double(s);
}

__global__ void sumsq_final_kernel(float* out, const double* partial, int64_t nblocks) {
  __shared__ double sh[kThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < nblocks; i += blockDim.x) s += partial[i];
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] += float(sh[0]);
}

__global__ void nonfinite_count_kernel(unsigned long long* count, const float* x, int64_t n) {
  unsigned long long bad = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    bad += !isfinite(x[i]);
  for (int o = 16; o > 0; o >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, o);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(count, bad);  // integer: order does not matter
}

__global__ void nonfinite_store_kernel(float* out, const unsigned long long* count) { out[0] = float(*count); }

}  // namespace

void fill(Exec& ex, float* y, int64_t n, float value) {
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  fill_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(y, n, value);
  check_launch("fill_kernel");
}

void copy_cast(Exec& ex, void* y, DType ydt, const void* x, DType xdt, int64_t n) {
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  if (ydt == xdt) {
    if (y == x) return;
    size_t bytes = size_t(n) * dtype_size(ydt);
    const char *yc = static_cast<const char*>(y), *xc = static_cast<const char*>(x);
    if (yc < xc + bytes && xc < yc + bytes) {  // overlapping: memmove semantics through scratch
      Scratch tmp(ex, bytes);
      MLORA_CUDA_CHECK(cudaMemcpyAsync(tmp.as<void>(), x, bytes, cudaMemcpyDeviceToDevice, s));
      MLORA_CUDA_CHECK(cudaMemcpyAsync(y, tmp.as<void>(), bytes, cudaMemcpyDeviceToDevice, s));
    } else {
      MLORA_CUDA_CHECK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice, s));
    }
    return;
  }
  cast_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(y, ydt, x, xdt, n);
  check_launch("cast_kernel");
}

void axpy(Exec& ex, float* y, const float* x, int64_t n, float alpha) {
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  axpy_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(y, x, n, alpha);
  check_launch("axpy_kernel");
}

void add_bias(Exec& ex, float* y, WeightRef b, int64_t n, int64_t m) {
  if (n <= 0 || m <= 0) return;
  cudaStream_t s = enter(ex);
  with_weight_loader(b, "add_bias", [&](auto loader, auto ptr) {
    add_bias_kernel<decltype(loader)><<<grid_for(n * m, kThreads), kThreads, 0, s>>>(y, ptr, n, m);
  });
  check_launch("add_bias_kernel");
}

void scale(Exec& ex, float* y, int64_t n, float alpha) {
  if (n <= 0) return;
  cudaStream_t s = enter(ex);
  scale_kernel<<<grid_for(n, kThreads), kThreads, 0, s>>>(y, n, alpha);
  check_launch("scale_kernel");
}

void sumsq(Exec& ex, float* out, const float* const* xs, const int64_t* ns, int64_t count) {
  cudaStream_t s = enter(ex);
  std::vector<const float*> ptrs;
  std::vector<int64_t> sizes, first;
  int64_t blocks = 0;
  for (int64_t t = 0; t < count; t++) {
    if (ns[t] <= 0) continue;
    ptrs.push_back(xs[t]);
    sizes.push_back(ns[t]);
    first.push_back(blocks);
    blocks += (ns[t] + kSumChunk - 1) / kSumChunk;
  }
  if (blocks == 0) return;  // out[0] += 0
  if (blocks > INT32_MAX) throw Error("sumsq: too many elements for one call");
  int64_t c = int64_t(ptrs.size());
  // One scratch block: [pointers | sizes | first blocks | partial sums]
  size_t off_sizes = size_t(c) * sizeof(void*), off_first = off_sizes + size_t(c) * 8,
         off_part = (off_first + size_t(c) * 8 + 15) & ~size_t(15);
  Scratch buf(ex, off_part + size_t(blocks) * sizeof(double));
  char* base = buf.as<char>();
  upload(ex, base, ptrs.data(), off_sizes);
  upload(ex, base + off_sizes, sizes.data(), size_t(c) * 8);
  upload(ex, base + off_first, first.data(), size_t(c) * 8);
  double* partial = reinterpret_cast<double*>(base + off_part);
  sumsq_partial_kernel<<<unsigned(blocks), kThreads, 0, s>>>(partial, reinterpret_cast<const float* const*>(base),
                                                             reinterpret_cast<const int64_t*>(base + off_sizes),
                                                             reinterpret_cast<const int64_t*>(base + off_first), c);
  check_launch("sumsq_partial_kernel");
  sumsq_final_kernel<<<1, kThreads, 0, s>>>(out, partial, blocks);
  check_launch("sumsq_final_kernel");
}

void nonfinite(Exec& ex, float* out, const float* x, int64_t n) {
  cudaStream_t s = enter(ex);
  Scratch cnt(ex, sizeof(unsigned long long));
  MLORA_CUDA_CHECK(cudaMemsetAsync(cnt.as<void>(), 0, sizeof(unsigned long long), s));
  if (n > 0) {
    nonfinite_count_kernel<<<grid_for(n, kThreads, 4096), kThreads, 0, s>>>(cnt.as<unsigned long long>(), x, n);
    check_launch("nonfinite_count_kernel");
  }
  nonfinite_store_kernel<<<1, 1, 0, s>>>(out, cnt.as<unsigned long long>());
  check_launch("nonfinite_store_kernel");
}

}  // namespace mlora::cuda
