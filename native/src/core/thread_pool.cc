#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <exception>
#include <future>
#include <utility>

namespace mlora {

namespace {
// Best effort: a core the process may not use (a changed affinity mask) leaves the thread unpinned.
void pin_to(int core) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(core, &set);
  sched_setaffinity(0, sizeof set, &set);
}

// Named by the creating thread, so the name is there as soon as the constructor returns; Linux
// keeps 15 characters of it.
void name_thread(std::thread& t, const std::string& name) {
  pthread_setname_np(t.native_handle(), name.substr(0, 15).c_str());
}
}  // namespace

ThreadPool::ThreadPool(int threads, bool leader, std::vector<int> cores, std::string name)
    : nthreads_(std::max(1, threads)), cores_(std::move(cores)), name_(std::move(name)) {
  if (!cores_.empty() && int(cores_.size()) != nthreads_) cores_.clear();
  for (int t = 1; t < nthreads_; t++) {
    workers_.emplace_back([this, t] { worker_loop(t); });
    if (!name_.empty()) name_thread(workers_.back(), "mlora " + name_ + "/" + std::to_string(t));
  }
  if (leader || !cores_.empty()) {
    leader_ = std::thread([this] { leader_loop(); });
    if (!name_.empty()) name_thread(leader_, "mlora " + name_);
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
  if (leader_.joinable()) {
    {
      std::lock_guard<std::mutex> lk(leader_mu_);
      leader_stop_ = true;
    }
    leader_cv_.notify_one();
    leader_.join();
  }
}

void ThreadPool::leader_loop() {
  if (!cores_.empty()) pin_to(cores_[0]);
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lk(leader_mu_);
      leader_cv_.wait(lk, [&] { return leader_stop_ || !leader_jobs_.empty(); });
      if (leader_jobs_.empty()) return;  // stopped, and nothing left to run
      job = std::move(leader_jobs_.front());
      leader_jobs_.pop_front();
    }
    job();
  }
}

void ThreadPool::post_to_leader(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lk(leader_mu_);
    leader_jobs_.push_back(std::move(job));
  }
  leader_cv_.notify_one();
}

void ThreadPool::run_on_leader(const std::function<void()>& fn) {
  if (!has_leader()) return fn();
  std::promise<void> done;
  post_to_leader([&] {
    try {
      fn();
      done.set_value();
    } catch (...) {
      done.set_exception(std::current_exception());
    }
  });
  done.get_future().get();
}

void ThreadPool::worker_loop(int tid) {
  if (!cores_.empty()) pin_to(cores_[tid]);
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int)>* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    (*job)(tid);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

void ThreadPool::run_on_all(const std::function<void(int)>& fn) {
  if (nthreads_ == 1) {
    fn(0);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &fn;
    pending_ = nthreads_ - 1;
    generation_++;
  }
  cv_.notify_all();
  fn(0);
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t chunks = std::min<int64_t>(nthreads_, (n + grain - 1) / grain);
  if (chunks <= 1) {
    fn(0, n, 0);
    return;
  }
  run_on_all([&](int tid) {
    if (tid >= chunks) return;
    int64_t b = n * tid / chunks, e = n * (tid + 1) / chunks;
    if (b < e) fn(b, e, tid);
  });
}

void ThreadPool::parallel_dynamic(int64_t n, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  if (nthreads_ == 1 || n == 1) {
    for (int64_t i = 0; i < n; i++) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  run_on_all([&](int tid) {
    for (;;) {
      int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      fn(i, tid);
    }
  });
}

}  // namespace mlora
