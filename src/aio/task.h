#pragma once
// Task<T>: a lazily started coroutine that produces a T. The frame is owned by the Task object;
// awaiting a Task starts it and transfers control to it symmetrically (no stack growth for long
// await chains), and the awaiting coroutine resumes when the task finishes. Errors are values
// (Result<T>), never exceptions: an exception escaping a task terminates the process.
//
// g++ 12 note: bind awaited values to locals (`auto r = co_await f(); use(r);`) instead of using
// `co_await` inside larger expressions with temporaries; g++ 12 miscompiles some of those.

#include <coroutine>
#include <exception>
#include <optional>
#include <utility>

namespace strata::aio {

template <typename T = void>
class Task;

namespace detail {

struct PromiseBase {
  // Resumed when this task finishes; noop for a task nobody awaits (a runner's root).
  std::coroutine_handle<> continuation = std::noop_coroutine();

  struct FinalAwaiter {
    bool await_ready() noexcept { return false; }
    template <typename Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> self) noexcept {
      return self.promise().continuation;
    }
    void await_resume() noexcept {}
  };

  std::suspend_always initial_suspend() noexcept { return {}; }
  FinalAwaiter final_suspend() noexcept { return {}; }
  [[noreturn]] void unhandled_exception() noexcept { std::terminate(); }
};

template <typename T>
struct Promise : PromiseBase {
  std::optional<T> value;
  Task<T> get_return_object() noexcept;
  template <typename U>
  void return_value(U&& result) {
    value.emplace(std::forward<U>(result));
  }
  T take() { return std::move(*value); }
};

template <>
struct Promise<void> : PromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() noexcept {}
  void take() {}
};

}  // namespace detail

template <typename T>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::Promise<T>;
  using Handle = std::coroutine_handle<promise_type>;

  Task() = default;
  explicit Task(Handle handle) : handle_(handle) {}
  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  // Destroying a task that is suspended destroys its frame and, recursively, the frames it owns;
  // awaiters clean up after themselves (I/O is cancelled and reaped, waiters are unlinked).
  ~Task() { reset(); }

  bool valid() const { return static_cast<bool>(handle_); }
  bool done() const { return handle_ && handle_.done(); }

  struct Awaiter {
    Handle handle;
    bool await_ready() noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
      handle.promise().continuation = awaiting;
      return handle;
    }
    T await_resume() { return handle.promise().take(); }
  };
  Awaiter operator co_await() && noexcept { return Awaiter{handle_}; }
  Awaiter operator co_await() & noexcept { return Awaiter{handle_}; }

  // For runners (EventLoop::block_on, TaskGroup): access to the frame without awaiting.
  Handle handle() const { return handle_; }
  Handle release() { return std::exchange(handle_, {}); }

 private:
  void reset() {
    if (handle_) {
      handle_.destroy();
      handle_ = {};
    }
  }
  Handle handle_;
};

namespace detail {
template <typename T>
Task<T> Promise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<Promise<T>>::from_promise(*this));
}
inline Task<void> Promise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<Promise<void>>::from_promise(*this));
}
}  // namespace detail

}  // namespace strata::aio
