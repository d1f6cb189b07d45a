#pragma once
// EventLoop: one per thread, over its own io_uring. Every I/O the data plane does is an awaitable
// built here; the completion object lives in the awaiting coroutine's frame and is the request's
// user_data, so a request costs no allocation.
//
// Threading contract: everything except post(), wake() and stop() must be called on the loop's
// own thread (the thread that calls run()/block_on()). Coroutines suspended on this loop resume
// on this thread.
//
// Lifetime contract: a frame suspended on an I/O awaitable may be destroyed at any time; the
// awaitable's destructor cancels the request and waits for its completion, so the kernel never
// touches a buffer after its owner is gone. Frames must be destroyed before their loop.

#include <liburing.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "aio/task.h"
#include "base/result.h"

namespace strata::aio {

class EventLoop;

// One submitted io_uring request, embedded in the awaiter that waits for it.
struct IoOp {
  std::coroutine_handle<> waiter;
  int result = 0;
  bool pending = false;
};

// Awaitable for one io_uring request. `prepare` fills the SQE; co_await yields the CQE result:
// a byte count or other non-negative value, or -errno.
class IoAwaiter {
 public:
  using Prepare = void (*)(io_uring_sqe*, const void* args);
  IoAwaiter(EventLoop& loop, Prepare prepare, const void* args)
      : loop_(loop), prepare_(prepare), args_(args) {}
  IoAwaiter(const IoAwaiter&) = delete;
  IoAwaiter& operator=(const IoAwaiter&) = delete;
  ~IoAwaiter();

  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> waiter);
  int await_resume() const noexcept { return op_.result; }

 private:
  EventLoop& loop_;
  Prepare prepare_;
  const void* args_;
  IoOp op_;
};

// Arguments of one request; stored in the awaiting frame next to the IoAwaiter that reads them.
struct IoArgs {
  int fd = -1;
  const iovec* iov = nullptr;
  unsigned iov_count = 0;
  void* buffer = nullptr;
  uint64_t length = 0;
  uint64_t offset = 0;
  int flags = 0;
  int mode = 0;
  const sockaddr* address = nullptr;
  socklen_t address_length = 0;
  __kernel_timespec timeout{};
};

class EventLoop {
 public:
  using Clock = std::chrono::steady_clock;

  // Creates a loop with an io_uring of `queue_depth` entries. Fails with the kernel's reason when
  // io_uring is unavailable (for example blocked by seccomp).
  static Result<std::unique_ptr<EventLoop>> create(unsigned queue_depth = 256);
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // The loop that is running on the calling thread, or nullptr.
  static EventLoop* current();

  // Runs the loop until stop() is called (a stop() made before run() starts ends it at once;
  // each run uses up the stop that ended it). Returns with any requests still in flight; their
  // frames stay suspended until they are resumed by a later run or destroyed by their owners.
  void run();
  // Runs the loop until `task` finishes and returns its value.
  template <typename T>
  T block_on(Task<T> task);
  // Runs one iteration: resumes ready coroutines, handles posted work, reaps completions (waiting
  // for at least one if `wait` and nothing else is ready). Returns false once stop() was called.
  bool run_once(bool wait);

  // Thread-safe: asks run() to return after its current iteration.
  void stop();
  // Thread-safe: runs `fn` on this loop's thread during a later iteration.
  void post(std::function<void()> fn);
  // Same thread: resumes `handle` during a later iteration (not recursively from here).
  void schedule(std::coroutine_handle<> handle);
  // Same thread: withdraws every pending schedule() of `handle`. An awaiter whose frame is
  // destroyed after it was scheduled and before it resumed calls this from its destructor, so the
  // loop never resumes a destroyed frame. Costs a scan of the ready queue.
  void unschedule(std::coroutine_handle<> handle);

  // Awaitables. Each yields the CQE result (bytes or value, or -errno). The caller keeps buffers
  // and iovecs alive until the co_await returns.
  struct Op {
    IoArgs args;
    IoAwaiter awaiter;
    Op(EventLoop& loop, IoAwaiter::Prepare prepare, IoArgs a)
        : args(a), awaiter(loop, prepare, &args) {}
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> h) { return awaiter.await_suspend(h); }
    int await_resume() const noexcept { return awaiter.await_resume(); }
  };
  Op readv(int fd, const iovec* iov, unsigned count, uint64_t offset);
  Op writev(int fd, const iovec* iov, unsigned count, uint64_t offset);
  Op read(int fd, void* buffer, uint32_t length, uint64_t offset);
  Op write(int fd, const void* buffer, uint32_t length, uint64_t offset);
  Op fsync(int fd);
  Op fdatasync(int fd);
  Op fallocate(int fd, int mode, uint64_t offset, uint64_t length);
  Op accept(int fd, int flags = 0);
  Op connect(int fd, const sockaddr* address, socklen_t length);
  Op recv(int fd, void* buffer, uint32_t length, int flags = 0);
  Op send(int fd, const void* buffer, uint32_t length, int flags = MSG_NOSIGNAL);
  Op sendmsg_iov(int fd, const iovec* iov, unsigned count);
  Op poll(int fd, unsigned events);
  // Completes after `duration` with -ETIME (the timer expired) or -ECANCELED.
  Op sleep_for(std::chrono::nanoseconds duration);

  // Resumes the awaiting coroutine on this loop: co_await other_loop.hop() moves a coroutine to
  // another loop's thread.
  auto hop() {
    struct HopAwaiter {
      EventLoop& loop;
      bool await_ready() const noexcept { return EventLoop::current() == &loop; }
      void await_suspend(std::coroutine_handle<> h) {
        loop.post([h] { h.resume(); });
      }
      void await_resume() const noexcept {}
    };
    return HopAwaiter{*this};
  }
  // Lets other ready coroutines run before continuing. The suspended frame may be destroyed
  // before it resumes.
  auto yield() {
    struct YieldAwaiter {
      EventLoop& loop;
      std::coroutine_handle<> scheduled = {};
      ~YieldAwaiter() {
        if (scheduled) {
          loop.unschedule(scheduled);
        }
      }
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> h) {
        scheduled = h;
        loop.schedule(h);
      }
      void await_resume() noexcept { scheduled = {}; }
    };
    return YieldAwaiter{*this};
  }

  // Requests submitted and not yet completed.
  uint64_t in_flight() const { return in_flight_; }
  bool stopping() const { return stop_requested_.load(std::memory_order_relaxed); }

 private:
  friend class IoAwaiter;
  EventLoop() = default;

  bool submit(IoOp* op, IoAwaiter::Prepare prepare, const void* args);
  // Cancels `op` and reaps completions until its own arrives; other completions are queued in
  // completed_ and delivered by a later iteration. An op whose completion is already queued is
  // just taken off the queue.
  void cancel_and_wait(IoOp* op);
  // Delivers queued completions one at a time, so a frame destroyed by an earlier delivery can
  // take its own completion off the queue first (its op stays `pending` until delivered).
  void deliver_completed();
  io_uring_sqe* get_sqe();
  void reap(bool wait);
  void deliver(IoOp* op, int result);
  void arm_wakeup();
  void drain_posted();

  io_uring ring_{};
  bool ring_ready_ = false;
  int wake_fd_ = -1;
  uint64_t wake_value_ = 0;
  IoOp wake_op_;
  bool wake_armed_ = false;
  uint64_t in_flight_ = 0;
  unsigned unsubmitted_ = 0;
  std::deque<std::coroutine_handle<>> ready_;
  std::deque<std::pair<IoOp*, int>> completed_;
  std::atomic<bool> stop_requested_{false};
  std::mutex posted_mutex_;
  std::vector<std::function<void()>> posted_;
  std::atomic<bool> posted_pending_{false};
};

namespace detail {
// Root coroutine used by block_on: records completion of the awaited task.
struct BlockOnRunner {
  struct promise_type {
    bool finished = false;
    EventLoop* loop = nullptr;
    BlockOnRunner get_return_object() {
      return BlockOnRunner{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    struct Final {
      bool await_ready() noexcept { return false; }
      void await_suspend(std::coroutine_handle<promise_type> h) noexcept {
        h.promise().finished = true;
        // Keeps the current run_once from blocking in the kernel now that block_on is done:
        // a queued no-op makes the iteration non-waiting.
        h.promise().loop->schedule(std::noop_coroutine());
      }
      void await_resume() noexcept {}
    };
    Final final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    [[noreturn]] void unhandled_exception() noexcept { std::terminate(); }
  };
  std::coroutine_handle<promise_type> handle;
  ~BlockOnRunner() {
    if (handle) {
      handle.destroy();
    }
  }
};

template <typename T>
BlockOnRunner block_on_body(Task<T>& task, std::optional<T>& out) {
  out.emplace(co_await task);
}
inline BlockOnRunner block_on_body(Task<void>& task, std::optional<bool>& out) {
  co_await task;
  out.emplace(true);
}
}  // namespace detail

template <typename T>
T EventLoop::block_on(Task<T> task) {
  if constexpr (std::is_void_v<T>) {
    std::optional<bool> out;
    detail::BlockOnRunner runner = detail::block_on_body(task, out);
    runner.handle.promise().loop = this;
    schedule(runner.handle);  // started inside run_once, so EventLoop::current() is this loop
    while (!runner.handle.promise().finished) {
      run_once(true);
    }
  } else {
    std::optional<T> out;
    detail::BlockOnRunner runner = detail::block_on_body(task, out);
    runner.handle.promise().loop = this;
    schedule(runner.handle);  // started inside run_once, so EventLoop::current() is this loop
    while (!runner.handle.promise().finished) {
      run_once(true);
    }
    return std::move(*out);
  }
}

}  // namespace strata::aio
