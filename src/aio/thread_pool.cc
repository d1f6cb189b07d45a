#include "aio/thread_pool.h"

#include <cstdio>
#include <cstdlib>

namespace strata::aio {

namespace detail {

void prepare_pool_job(PoolJob& job, std::coroutine_handle<> waiter) {
  job.loop = EventLoop::current();
  if (job.loop == nullptr) {
    std::fputs("strata: ThreadPool::run awaited outside a running EventLoop\n", stderr);
    std::abort();
  }
  job.waiter = waiter;
}

}  // namespace detail

ThreadPool::ThreadPool(size_t threads) {
  if (threads == 0) {
    threads = 1;
  }
  workers_.reserve(threads);
  for (size_t i = 0; i < threads; ++i) {
    workers_.emplace_back([this] { work(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& worker : workers_) {
    worker.join();
  }
}

void ThreadPool::submit(std::shared_ptr<detail::PoolJob> job) {
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(job));
  }
  wake_.notify_one();
}

void ThreadPool::work() {
  for (;;) {
    std::shared_ptr<detail::PoolJob> job;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) {
        return;  // stopping and nothing left
      }
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job->execute();
    EventLoop* loop = job->loop;
    // The waiter is read and cleared only on the loop thread, where its frame may be destroyed.
    loop->post([job = std::move(job)] {
      if (auto waiter = std::exchange(job->waiter, {})) {
        waiter.resume();
      }
    });
  }
}

}  // namespace strata::aio
