// A per-device pool of compute threads. Each device owns one, so two stage actors on two
// cores never fight over a process-global pool (the reason we do not use OpenMP's).
// The calling thread takes part as worker 0; parallel_for returns when every chunk is done.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlora {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return nthreads_; }

  // Runs fn(tid) once on each of the pool's threads (tid in [0, size())).
  void run_on_all(const std::function<void(int)>& fn);

  // Splits [0, n) into contiguous chunks of at least `grain` items, one per thread at most,
  // and runs fn(begin, end, tid) on each. Small n runs inline on the caller.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

  // Dynamic scheduling: items [0, n) handed out one at a time (for uneven work such as
  // attention over sequences of different lengths). fn(item, tid).
  void parallel_dynamic(int64_t n, const std::function<void(int64_t, int)>& fn);

 private:
  void worker_loop(int tid);

  int nthreads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

}  // namespace mlora
