// Devices, their byte budgets and the storage that is counted against them.
//
// Every byte a tensor owns is counted against its device's budget when it is allocated and
// given back when the last reference to the storage drops (so a kernel still running on a
// freed tensor keeps its memory alive until it finishes). Freed blocks are cached by size and
// reused, because first-touch page faults are expensive on the machines we run on.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtype.h"
#include "thread_pool.h"

namespace mlora {

// Codes a JavaScript caller compares (err.code) instead of matching message text; lib/errors.ts
// names the same strings.
inline constexpr const char* kErrOutOfMemory = "ERR_MLORA_OOM";
inline constexpr const char* kErrBadInput = "ERR_MLORA_BAD_INPUT";

// Any failure inside the core: becomes a JavaScript Error at the N-API boundary, with `code`
// set when there is one.
struct Error : std::runtime_error {
  explicit Error(const std::string& what, const char* code = nullptr) : std::runtime_error(what), code(code) {}
  const char* code;
};

// What a device kind must provide. The CPU one is in core/device.cc, the CUDA one in
// cuda/backend.cu (compiled only where nvcc exists).
struct Backend {
  virtual ~Backend() = default;
  virtual void* raw_alloc(size_t bytes) = 0;  // nullptr on failure
  virtual void raw_free(void* p) = 0;
  virtual void zero(void* p, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_from_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  virtual void* stream() { return nullptr; }
  virtual int64_t free_memory() { return -1; }  // the hardware's free bytes, -1 if unknown
};

enum class DeviceKind { CPU, CUDA };

class DeviceState : public std::enable_shared_from_this<DeviceState> {
 public:
  // cores: empty, or one CPU id per thread to pin the device's compute threads to (ThreadPool).
  DeviceState(DeviceKind kind, int index, int threads, int64_t budget, std::unique_ptr<Backend> backend,
              std::vector<int> cores = {});
  ~DeviceState();

  const std::string& name() const { return name_; }
  DeviceKind kind() const { return kind_; }
  int index() const { return index_; }
  int64_t budget() const { return budget_; }
  int64_t used() const;    // bytes held by live tensors
  int64_t cached() const;  // bytes held in the reuse cache (free for new tensors)
  int64_t peak() const;
  void reset_peak();
  ThreadPool& pool() { return *pool_; }
  Backend& backend() { return *backend_; }
  std::mutex& exec_mutex() { return exec_mu_; }

  // Throws Error("device cpu:1: out of memory: asked 512 MiB, 96 MiB free of 4 GiB", kErrOutOfMemory).
  void* allocate(size_t bytes, bool zero);
  // What an allocation of `bytes` counts against the budget: one size class per 256 B (better reuse).
  static size_t counted_bytes(size_t bytes) { return bytes ? (bytes + 255) & ~size_t(255) : 256; }
  void release(void* p, size_t bytes);
  void trim_cache();

  // Per-op wall time, on only where MLORA_PROFILE_OPS is set when the device opens (a benchmark
  // aid: every op then also synchronizes). Keyed by op (addon.cc: name, "+lora", weight shape);
  // written and read under exec_mutex().
  struct OpTime {
    int64_t calls = 0;
    double seconds = 0;
  };
  bool profiling() const { return profiling_; }
  std::map<std::string, OpTime>& op_times() { return op_times_; }

  // Where the time of run() calls goes, summed since the last reset (always on: a few clock
  // reads per call). to_leader: from the call on the JS thread until the op list starts (libuv
  // queue, hand-off to the compute thread, a run before it); wall and cpu: the op list itself,
  // in wall time and in the computing thread's CPU time (less than wall: it was preempted);
  // back: from the op list's end until the JS thread settles the promise.
  struct RunStats {
    int64_t runs = 0;
    double to_leader_s = 0, wall_s = 0, cpu_s = 0, back_s = 0;
  };
  void add_run(const RunStats& r);
  RunStats run_stats(bool reset);

 private:
  std::string name_;
  DeviceKind kind_;
  int index_;
  int64_t budget_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<ThreadPool> pool_;
  mutable std::mutex mu_;
  std::mutex exec_mu_;
  int64_t used_ = 0, cached_ = 0, peak_ = 0;
  std::multimap<size_t, void*> cache_;
  bool profiling_ = false;
  std::map<std::string, OpTime> op_times_;
  RunStats run_stats_;
};

std::unique_ptr<Backend> make_cpu_backend();
// Returns nullptr and sets *why when CUDA is not compiled in or the device is not usable.
std::unique_ptr<Backend> make_cuda_backend(int index, std::string* why);
int cuda_device_count(std::string* why);  // 0 with a reason when none is usable
bool cuda_compiled();
// Which GEMM the CUDA kernels use: "cublas 13.0.x (/path)" or "fallback (tiled kernel; why)".
std::string cuda_gemm_info();

std::string format_bytes(int64_t b);

struct Storage;

// The GEMM panels of a frozen weight, packed once by Device.packWeights: which view of the
// weight's storage (offset, dtype, shape) and which GEMM (linear_forward or linear_backward,
// bf16 compute or not) they serve. Their bytes are a storage of their own, counted like any.
struct WeightPanels {
  size_t offset = 0;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0;
  bool forward = true, bf16 = false;
  std::shared_ptr<Storage> storage;
};

// A block of memory: owned by a device (counted) or borrowed from JavaScript (a
// SharedArrayBuffer or ArrayBuffer that the JS side keeps alive).
struct Storage {
  std::shared_ptr<DeviceState> device;
  void* ptr = nullptr;
  size_t bytes = 0;
  bool borrowed = false;
  // Only ever added to (on the JS thread, once packed), so a kernel holding a panel pointer
  // can rely on it while the weight lives; they go with the weight.
  std::vector<WeightPanels> panels;
  ~Storage() {
    if (!borrowed && ptr) device->release(ptr, bytes);
  }
};

// A typed, shaped window onto a Storage. Views (rows, reshape) share the storage.
struct TensorImpl {
  std::shared_ptr<Storage> storage;
  size_t offset = 0;  // bytes into storage
  DType dtype = DType::F32;
  std::vector<int64_t> shape;

  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  size_t nbytes() const {
    if (dtype_quantized(dtype)) return shape.size() == 2 ? quant_layout(dtype, shape[0], shape[1]).bytes : 0;
    return size_t(numel()) * dtype_size(dtype);
  }
  void* data() const { return static_cast<char*>(storage->ptr) + offset; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data());
  }
  DeviceState& device() const { return *storage->device; }
  std::string shape_str() const;
};

}  // namespace mlora
