// What every CUDA kernel file shares: the CUDA Backend object (one per device: its stream,
// its cuBLAS handle, its device-side error word), error checking that throws mlora::Error,
// scratch buffers counted against the device budget, and dtype conversions on the device.
//
// Nothing here is a mutable global: state hangs off the Backend of one DeviceState, and the
// addon is loaded once per worker thread. The only process-wide thing is the table of cuBLAS
// entry points, filled once (thread-safe static initialisation) and read-only afterwards.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../core/device.h"
#include "../core/exec.h"
#include "../kernels.h"

namespace mlora::cuda {

// "cudaMalloc: cudaErrorMemoryAllocation (out of memory)".
std::string cuda_error_text(const char* call, cudaError_t e);
[[noreturn]] void throw_cuda(const char* call, cudaError_t e);

#define MLORA_CUDA_CHECK(call)                                               \
  do {                                                                       \
    cudaError_t mlora_e_ = (call);                                           \
    if (mlora_e_ != cudaSuccess) ::mlora::cuda::throw_cuda(#call, mlora_e_); \
  } while (0)

// After a kernel launch: a bad configuration (too many threads, too much shared memory) or
// an earlier asynchronous fault shows up here, named after the kernel.
void check_launch(const char* kernel);

// Device-side argument errors (a token id outside the vocabulary, a position outside the
// rope table, bad sequence offsets) cannot throw inside a kernel. The kernel records the first
// one in the backend's error word and writes zeros instead of reading out of bounds; the next
// synchronize() turns it into an Error naming the kernel and the values.
struct DeviceError {
  int code;  // 0 = none; see kErr* below
  int pad;
  long long a, b, c;
};
enum : int {
  kErrNone = 0,
  kErrEmbeddingId = 1,  // a: row, b: id, c: vocab
  kErrRopePos = 2,      // a: row, b: pos, c: max_pos
  kErrCuSeqlens = 3,    // a: index, b: value, c: n
  kErrLabel = 4,        // a: row, b: label, c: vocab
};

__device__ __forceinline__ void report_error(DeviceError* e, int code, long long a, long long b, long long c) {
  if (atomicCAS(&e->code, 0, -1) == 0) {
    e->a = a;
    e->b = b;
    e->c = c;
    __threadfence();
    atomicExch(&e->code, code);
  }
}

// GEMM entry points of a dynamically loaded cuBLAS (no headers or libraries are needed at
// build time). See gemm.cu.
struct Cublas;
const Cublas* cublas_library(std::string* why);  // nullptr + reason when not found
std::string gemm_backend_description();

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int index);
  ~CudaBackend() override;

  void* raw_alloc(size_t bytes) override;
  void raw_free(void* p) override;
  void zero(void* p, size_t bytes) override;
  void copy_to_host(void* dst, const void* src, size_t bytes) override;
  void copy_from_host(void* dst, const void* src, size_t bytes) override;
  void copy_device(void* dst, const void* src, size_t bytes) override;
  void synchronize() override;
  void* stream() override { return stream_; }
  int64_t free_memory() override;

  int index() const { return index_; }
  cudaStream_t cu_stream() const { return stream_; }
  // Makes this backend's GPU current on the calling thread (async work runs on libuv's pool,
  // so every entry point calls this first).
  void activate() const;
  DeviceError* device_error() const { return err_; }
  // The cuBLAS handle bound to this stream, created on first use; nullptr when cuBLAS is not
  // available or MLORA_CUDA_GEMM=fallback was set when the device was opened.
  void* cublas_handle();
  bool use_tf32() const { return tf32_; }
  int sm_count() const { return sm_count_; }

 private:
  void check_device_error();
  int index_;
  cudaStream_t stream_ = nullptr;
  DeviceError* err_ = nullptr;       // device memory, written by kernels
  DeviceError* err_host_ = nullptr;  // pinned host copy, read after each synchronize
  void* cublas_ = nullptr;
  bool cublas_tried_ = false;
  bool force_fallback_ = false;
  bool tf32_ = false;
  int sm_count_ = 1;
};

inline CudaBackend& backend_of(Exec& ex) { return static_cast<CudaBackend&>(ex.dev.backend()); }
inline cudaStream_t stream_of(Exec& ex) { return static_cast<cudaStream_t>(ex.stream()); }

// Makes the device current and returns its stream: the first line of every kernel entry.
inline cudaStream_t enter(Exec& ex) {
  backend_of(ex).activate();
  return stream_of(ex);
}

// Scratch device memory for one kernel call, counted against the device budget while it is
// held. Given back to the device's block cache at the end of the call: later users of the
// block run on the same stream, so they are ordered after the kernels that used it here.
class Scratch {
 public:
  Scratch(Exec& ex, size_t bytes) : dev_(ex.dev), bytes_(bytes ? bytes : 1) { p_ = dev_.allocate(bytes_, false); }
  ~Scratch() { dev_.release(p_, bytes_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  DeviceState& dev_;
  size_t bytes_;
  void* p_ = nullptr;
};

// Copies a small host array (pointer tables, offsets) to device scratch on the stream. The
// host array may be reused as soon as this returns (pageable copies are staged by CUDA).
void upload(Exec& ex, void* dst, const void* src, size_t bytes);

inline unsigned grid_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 16) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return unsigned(b);
}

// ---- element conversions on the device, bit-exact with core/dtype.h where it matters.
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, quiet NaN
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }

// Loads element i of a weight stored as T (float, or uint16 bits tagged by the dtype).
struct LoadF32 {
  using T = float;
  __device__ __forceinline__ static float load(const float* p, int64_t i) { return p[i]; }
};
struct LoadBF16 {
  using T = uint16_t;
  __device__ __forceinline__ static float load(const uint16_t* p, int64_t i) { return bf16_bits_to_f32(p[i]); }
};
struct LoadF16 {
  using T = uint16_t;
  __device__ __forceinline__ static float load(const uint16_t* p, int64_t i) { return f16_bits_to_f32(p[i]); }
};

// Calls f.template operator()<Loader>() with the loader for w's dtype.
template <typename F>
void with_weight_loader(WeightRef w, const char* what, F&& f) {
  switch (w.dtype) {
    case DType::F32: f(LoadF32{}, static_cast<const float*>(w.ptr)); break;
    case DType::BF16: f(LoadBF16{}, static_cast<const uint16_t*>(w.ptr)); break;
    case DType::F16: f(LoadF16{}, static_cast<const uint16_t*>(w.ptr)); break;
    default: throw Error(std::string(what) + ": weights must be f32, bf16 or f16, got " + dtype_name(w.dtype));
  }
}

// Block-wide sum / max of one float per thread (blockDim.x a multiple of 32, at most 1024).
// Deterministic: a fixed reduction tree. `shared` holds at least 32 floats.
struct SumOp {
  static constexpr float identity = 0.f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  static constexpr float identity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v) {
  for (int o = 16; o > 0; o >>= 1) v = Op()(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* shared) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_reduce<Op>(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = lane < nw ? shared[lane] : Op::identity;
  return warp_reduce<Op>(r);
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<SumOp>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<MaxOp>(v); }
__device__ __forceinline__ float block_sum(float v, float* shared) { return block_reduce<SumOp>(v, shared); }
__device__ __forceinline__ float block_max(float v, float* shared) { return block_reduce<MaxOp>(v, shared); }

// ---- the tiled GEMM shared by the fallback GEMM and the segmented LoRA kernels (gemm.cu).
// C = alpha·op(A)·op(B) + beta·C for up to kMaxGroups independent problems in one launch.
// Dropout (LoRA) can multiply op(A)'s elements (rows of x), op(B)'s elements or the product
// by the mask of core/dropout_hash.h.
enum DropWhere : int { kDropNone = 0, kDropA = 1, kDropB = 2, kDropC = 3 };

struct GemmProblem {
  const float* a;  // f32 always
  const void* b;   // element type: the launch's B loader
  float* c;
  int64_t lda, ldb, ldc;
  int64_t m, n, k;
  float alpha, beta;
  // Dropout of the masked operand: element (row r, column j) of x is masked by
  // dropout_factor(seed, position + r, j, p), r counted from the segment's first row.
  float p;
  uint64_t seed;
  int64_t position;
};

constexpr int kMaxGroups = 64;  // problems per launch (passed by value: ~6 KiB of parameters)

// Runs `count` problems (count <= kMaxGroups per launch; more are split into several launches).
// trans_a / trans_b as in gemm(); drop selects what the mask multiplies.
void grouped_gemm(Exec& ex, const GemmProblem* probs, int count, bool trans_a, bool trans_b, DType b_dtype,
                  DropWhere drop);

}  // namespace mlora::cuda
