// The CUDA Backend: device memory, copies and synchronisation on the device's own stream.
// Every CUDA error becomes an mlora::Error naming the call (never exit/abort). Per-device
// state (stream, cuBLAS handle, error word) lives in the backend object, never in globals.
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "common.cuh"

namespace mlora {
namespace cuda {

std::string cuda_error_text(const char* call, cudaError_t e) {
  std::string s = call;
  s += ": ";
  s += cudaGetErrorName(e);
  s += " (";
  s += cudaGetErrorString(e);
  s += ")";
  return s;
}

void throw_cuda(const char* call, cudaError_t e) {
  throw Error(cuda_error_text(call, e), e == cudaErrorMemoryAllocation ? kErrOutOfMemory : nullptr);
}

void check_launch(const char* kernel) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw Error(std::string("launching ") + kernel + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

void upload(Exec& ex, void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  MLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(ex)));
}

CudaBackend::CudaBackend(int index) : index_(index) {
  MLORA_CUDA_CHECK(cudaSetDevice(index_));
  MLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&err_), sizeof(DeviceError));
  if (e != cudaSuccess) {
    cudaStreamDestroy(stream_);
    throw_cuda("cudaMalloc(error word)", e);
  }
  e = cudaMallocHost(reinterpret_cast<void**>(&err_host_), sizeof(DeviceError));
  if (e == cudaSuccess) e = cudaMemset(err_, 0, sizeof(DeviceError));
  if (e != cudaSuccess) {
    if (err_host_) cudaFreeHost(err_host_);
    cudaFree(err_);
    cudaStreamDestroy(stream_);
    throw_cuda("allocating the error word", e);
  }
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index_) == cudaSuccess && sms > 0) sm_count_ = sms;
  const char* g = std::getenv("MLORA_CUDA_GEMM");
  force_fallback_ = g && std::strcmp(g, "fallback") == 0;
  const char* t = std::getenv("MLORA_CUDA_TF32");
  tf32_ = t && std::strcmp(t, "1") == 0;
}

void CudaBackend::activate() const { MLORA_CUDA_CHECK(cudaSetDevice(index_)); }

void* CudaBackend::raw_alloc(size_t bytes) {
  if (cudaSetDevice(index_) != cudaSuccess) return nullptr;
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
  if (e != cudaSuccess) {
    cudaGetLastError();  // out of memory is not sticky: clear it so later calls do not see it
    return nullptr;
  }
  return p;
}

void CudaBackend::raw_free(void* p) {
  // Called from destructors: cannot throw. A failure here means the context is already broken,
  // which the next checked call reports.
  if (cudaSetDevice(index_) != cudaSuccess) return;
  if (cudaFree(p) != cudaSuccess) cudaGetLastError();
}

void CudaBackend::zero(void* p, size_t bytes) {
  activate();
  MLORA_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
}

void CudaBackend::copy_to_host(void* dst, const void* src, size_t bytes) {
  activate();
  MLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
  synchronize();
}

void CudaBackend::copy_from_host(void* dst, const void* src, size_t bytes) {
  activate();
  MLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
  synchronize();  // the caller's host buffer (a JS typed array) may go away when we return
}

void CudaBackend::copy_device(void* dst, const void* src, size_t bytes) {
  activate();
  // cudaMemcpyDefault: unified addressing handles same-device, peer and host pointers. The
  // source may belong to another device's stream, so wait for the copy to finish.
  MLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
  synchronize();
}

// Called after the stream is synchronised; err_host_ then holds the copy made before the sync.
void CudaBackend::check_device_error() {
  DeviceError h = *err_host_;
  if (h.code == 0) return;
  MLORA_CUDA_CHECK(cudaMemsetAsync(err_, 0, sizeof(DeviceError), stream_));
  std::ostringstream s;
  switch (h.code) {
    case kErrEmbeddingId:
      s << "embedding: token id " << h.b << " at row " << h.a << " is outside the vocabulary [0, " << h.c << ")";
      break;
    case kErrRopePos:
      s << "rope: position " << h.b << " at row " << h.a << " is outside the cos/sin table [0, " << h.c << ")";
      break;
    case kErrCuSeqlens:
      s << "attention: cu_seqlens[" << h.a << "] = " << h.b
        << " is invalid (must start at 0, never decrease and end at n = " << h.c << ")";
      break;
    case kErrLabel:
      s << "cross_entropy: label " << h.b << " at row " << h.a << " is outside [0, " << h.c << ") (or -100 to ignore)";
      break;
    default: s << "a kernel reported error code " << h.code;
  }
  s << "; the affected outputs were written as zeros";
  throw Error(s.str());
}

void CudaBackend::synchronize() {
  activate();
  // The error word comes back with the same synchronisation (one round trip, not two).
  MLORA_CUDA_CHECK(cudaMemcpyAsync(err_host_, err_, sizeof(DeviceError), cudaMemcpyDeviceToHost, stream_));
  MLORA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda("a previous kernel", e);
  check_device_error();
}

int64_t CudaBackend::free_memory() {
  if (cudaSetDevice(index_) != cudaSuccess) return -1;
  size_t free_b = 0, total = 0;
  if (cudaMemGetInfo(&free_b, &total) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return int64_t(free_b);
}

}  // namespace cuda

bool cuda_compiled() { return true; }

int cuda_device_count(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (why) {
      *why = std::string("no CUDA driver/device: cudaGetDeviceCount returned ") + cudaGetErrorName(e) + " (" +
             cudaGetErrorString(e) + ")";
    }
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA device: cudaGetDeviceCount found none";
  if (n > 0 && why) why->clear();
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int index, std::string* why) {
  std::string reason;
  int n = cuda_device_count(&reason);
  if (n == 0) {
    *why = reason;
    return nullptr;
  }
  if (index < 0 || index >= n) {
    *why = "there are " + std::to_string(n) + " CUDA device(s): cuda:0.." + "cuda:" + std::to_string(n - 1);
    return nullptr;
  }
  try {
    return std::make_unique<cuda::CudaBackend>(index);
  } catch (const std::exception& e) {
    *why = e.what();
    return nullptr;
  }
}

std::string cuda_gemm_info() { return cuda::gemm_backend_description(); }

}  // namespace mlora
