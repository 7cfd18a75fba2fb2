// A per-device pool of compute threads. Each device owns one, so two stage actors on two
// cores never fight over a process-global pool (the reason we do not use OpenMP's).
// The calling thread takes part as worker 0; parallel_for returns when every chunk is done.
//
// With a leader, the pool also owns its worker 0: one thread that runs the device's whole op
// lists (run_on_leader). Without one, the op lists of two devices run on whichever libuv
// threads are free, and Linux often wakes one of them on the core the other device is
// computing on, where the two share that core for many milliseconds while the other core
// idles (a task that just woke counts as cache-hot and is not migrated); a thread of its own
// per device wakes where it last ran. Given cores (one per thread), the leader and the workers
// are also pinned to them.
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace mlora {

class ThreadPool {
 public:
  // leader: run op lists on a thread of the pool's own; cores: empty (not pinned), or one CPU id
  // per thread; name: what the threads are called in /proc (a device name: "cpu:0"), so a
  // profile or a per-thread CPU account can tell each device's compute threads apart.
  explicit ThreadPool(int threads, bool leader = false, std::vector<int> cores = {}, std::string name = "");
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return nthreads_; }
  const std::vector<int>& cores() const { return cores_; }

  bool has_leader() const { return leader_.joinable(); }

  // Runs fn on the leader thread and waits for it (inline on the caller when the pool has no
  // leader). Concurrent callers take turns, in the order they came (with post_to_leader's jobs).
  void run_on_leader(const std::function<void()>& fn);

  // Queues job for the leader thread and returns at once (has_leader() only): the leader runs
  // its jobs one at a time, first in, first out. A job handles its own errors.
  void post_to_leader(std::function<void()> job);

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
  void leader_loop();

  int nthreads_;
  std::vector<int> cores_;
  std::string name_;
  std::thread leader_;
  std::mutex leader_mu_;
  std::condition_variable leader_cv_;
  std::deque<std::function<void()>> leader_jobs_;
  bool leader_stop_ = false;
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
