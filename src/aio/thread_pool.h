#pragma once
// ThreadPool: runs blocking functions (open, stat, fallocate on filesystems that block, anything
// without an io_uring opcode) on worker threads, for coroutines on EventLoops.
//
//   int fd = co_await pool.run([&] { return ::open(path, O_RDWR); });
//
// The function starts when the call is awaited, runs on a worker and the awaiting coroutine
// resumes on the EventLoop it awaited from (through EventLoop::post). If the awaiting frame is
// destroyed meanwhile, the function still runs to completion and its result is dropped on the
// loop thread; nothing touches the frame. The loop must outlive every call awaited from it (the
// completion is posted to it), so destroy the pool, or let its work finish, before the loops.

#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "aio/event_loop.h"

namespace strata::aio {

class ThreadPool;

namespace detail {

// One call: shared between the awaiter (loop thread), the queue and the worker.
struct PoolJob {
  virtual ~PoolJob() = default;
  // Worker thread: runs the function and stores its result.
  virtual void execute() = 0;
  // Set by the loop thread before the job is queued; read by the worker.
  EventLoop* loop = nullptr;
  // Loop thread only: the suspended caller, cleared when it resumes or its frame is destroyed.
  std::coroutine_handle<> waiter;
};

// Loop thread: records the caller (aborts outside a running loop).
void prepare_pool_job(PoolJob& job, std::coroutine_handle<> waiter);

template <typename F>
class PoolCall {
 public:
  using Value = std::invoke_result_t<F&>;
  static_assert(!std::is_reference_v<Value>, "ThreadPool::run: return a value, not a reference");

  struct Job : PoolJob {
    explicit Job(F&& f) : fn(std::move(f)) {}
    void execute() override {
      if constexpr (std::is_void_v<Value>) {
        fn();
        result.emplace(true);
      } else {
        result.emplace(fn());
      }
    }
    F fn;
    std::optional<std::conditional_t<std::is_void_v<Value>, bool, Value>> result;
  };

  PoolCall(ThreadPool& pool, F&& fn) : pool_(pool), job_(std::make_shared<Job>(std::move(fn))) {}
  PoolCall(const PoolCall&) = delete;
  PoolCall& operator=(const PoolCall&) = delete;
  ~PoolCall() {
    if (job_ && job_->waiter) {
      job_->waiter = {};  // the completion finds nobody to resume
    }
  }

  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> waiter);
  Value await_resume() {
    if constexpr (!std::is_void_v<Value>) {
      return std::move(*job_->result);
    }
  }

 private:
  ThreadPool& pool_;
  std::shared_ptr<Job> job_;
};

}  // namespace detail

class ThreadPool {
 public:
  // Starts `threads` workers (at least one).
  explicit ThreadPool(size_t threads);
  // Finishes every queued call, then joins the workers.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // `co_await pool.run(fn)` yields fn()'s result; see the file comment for lifetimes.
  template <typename F>
  detail::PoolCall<std::decay_t<F>> run(F&& fn) {
    return detail::PoolCall<std::decay_t<F>>(*this, std::decay_t<F>(std::forward<F>(fn)));
  }

  size_t threads() const { return workers_.size(); }

 private:
  template <typename F>
  friend class detail::PoolCall;
  // Any thread: queues a prepared job.
  void submit(std::shared_ptr<detail::PoolJob> job);
  void work();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<detail::PoolJob>> queue_;  // guarded by mutex_
  bool stopping_ = false;                               // guarded by mutex_
  std::vector<std::thread> workers_;                    // set in the constructor
};

template <typename F>
void detail::PoolCall<F>::await_suspend(std::coroutine_handle<> waiter) {
  prepare_pool_job(*job_, waiter);
  pool_.submit(job_);
}

}  // namespace strata::aio
