#include "device.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace mlora {

std::string format_bytes(int64_t b) {
  char buf[64];
  double v = double(b);
  if (b >= (int64_t(1) << 30) && b % (int64_t(1) << 30) == 0) {
    snprintf(buf, sizeof buf, "%lld GiB", (long long)(b >> 30));
  } else if (b >= (int64_t(1) << 30)) {
    snprintf(buf, sizeof buf, "%.1f GiB", v / double(int64_t(1) << 30));
  } else if (b >= (int64_t(1) << 20)) {
    snprintf(buf, sizeof buf, "%lld MiB", (long long)((b + (1 << 19)) >> 20));
  } else if (b >= 1024) {
    snprintf(buf, sizeof buf, "%lld KiB", (long long)((b + 512) >> 10));
  } else {
    snprintf(buf, sizeof buf, "%lld B", (long long)b);
  }
  return buf;
}

std::string TensorImpl::shape_str() const {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); i++) s << (i ? "," : "") << shape[i];
  s << "]";
  return s.str();
}

namespace {
struct CpuBackend : Backend {
  void* raw_alloc(size_t bytes) override {
    void* p = nullptr;
    // 64-byte alignment for AVX-512 loads; round the size up so aligned_alloc accepts it.
    size_t sz = (bytes + 63) & ~size_t(63);
    if (posix_memalign(&p, 64, sz ? sz : 64) != 0) return nullptr;
    return p;
  }
  void raw_free(void* p) override { std::free(p); }
  void zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  void copy_to_host(void* d, const void* s, size_t n) override { std::memcpy(d, s, n); }
  void copy_from_host(void* d, const void* s, size_t n) override { std::memcpy(d, s, n); }
  void copy_device(void* d, const void* s, size_t n) override { std::memmove(d, s, n); }
  void synchronize() override {}
};
}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

DeviceState::DeviceState(DeviceKind kind, int index, int threads, int64_t budget, std::unique_ptr<Backend> backend,
                         std::vector<int> cores)
    : kind_(kind), index_(index), budget_(budget), backend_(std::move(backend)) {
  name_ = std::string(kind == DeviceKind::CPU ? "cpu:" : "cuda:") + std::to_string(index);
  // CPU devices compute on a leader thread of their own (thread_pool.h); a CUDA device keeps
  // launching from the calling thread
  pool_ = std::make_unique<ThreadPool>(threads, kind == DeviceKind::CPU, std::move(cores), name_);
  const char* prof = std::getenv("MLORA_PROFILE_OPS");
  profiling_ = prof && *prof && std::string(prof) != "0";
}

DeviceState::~DeviceState() {
  for (auto& kv : cache_) backend_->raw_free(kv.second);
}

int64_t DeviceState::used() const {
  std::lock_guard<std::mutex> lk(mu_);
  return used_;
}
int64_t DeviceState::cached() const {
  std::lock_guard<std::mutex> lk(mu_);
  return cached_;
}
int64_t DeviceState::peak() const {
  std::lock_guard<std::mutex> lk(mu_);
  return peak_;
}
void DeviceState::reset_peak() {
  std::lock_guard<std::mutex> lk(mu_);
  peak_ = used_;
}

void DeviceState::add_run(const RunStats& r) {
  std::lock_guard<std::mutex> lk(mu_);
  run_stats_.runs += r.runs;
  run_stats_.to_leader_s += r.to_leader_s;
  run_stats_.wall_s += r.wall_s;
  run_stats_.cpu_s += r.cpu_s;
  run_stats_.back_s += r.back_s;
}

DeviceState::RunStats DeviceState::run_stats(bool reset) {
  std::lock_guard<std::mutex> lk(mu_);
  RunStats r = run_stats_;
  if (reset) run_stats_ = RunStats{};
  return r;
}

void DeviceState::trim_cache() {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& kv : cache_) backend_->raw_free(kv.second);
  cache_.clear();
  cached_ = 0;
}

void* DeviceState::allocate(size_t bytes, bool zero) {
  const size_t rounded = counted_bytes(bytes);
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (used_ + int64_t(rounded) > budget_) {
      std::ostringstream s;
      s << "device " << name_ << ": out of memory: asked " << format_bytes(int64_t(bytes)) << ", "
        << format_bytes(budget_ - used_) << " free of " << format_bytes(budget_);
      throw Error(s.str(), kErrOutOfMemory);
    }
    auto it = cache_.find(rounded);
    if (it != cache_.end()) {
      p = it->second;
      cache_.erase(it);
      cached_ -= int64_t(rounded);
    }
    used_ += int64_t(rounded);
    if (used_ > peak_) peak_ = used_;
  }
  if (!p) {
    p = backend_->raw_alloc(rounded);
    if (!p) {
      trim_cache();  // the cache may hold what the hardware lacks
      p = backend_->raw_alloc(rounded);
    }
    if (!p) {
      std::lock_guard<std::mutex> lk(mu_);
      used_ -= int64_t(rounded);
      std::ostringstream s;
      s << "device " << name_ << ": allocation of " << format_bytes(int64_t(bytes))
        << " failed in the system allocator (" << format_bytes(used_) << " in use of a " << format_bytes(budget_)
        << " budget): the budget is larger than the memory really available";
      throw Error(s.str(), kErrOutOfMemory);
    }
  }
  if (zero) backend_->zero(p, rounded);
  return p;
}

void DeviceState::release(void* p, size_t bytes) {
  const size_t rounded = counted_bytes(bytes);
  std::lock_guard<std::mutex> lk(mu_);
  used_ -= int64_t(rounded);
  // Keep at most the budget's worth of cached blocks; the rest goes back to the system.
  if (cached_ + int64_t(rounded) <= budget_) {
    cache_.emplace(rounded, p);
    cached_ += int64_t(rounded);
  } else {
    backend_->raw_free(p);
  }
}

}  // namespace mlora
