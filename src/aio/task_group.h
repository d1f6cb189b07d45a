#pragma once
// TaskGroup: owns fire-and-forget coroutines, such as the daemon's per-connection handlers.
//
// spawn() starts a task at once, on the calling thread, and it runs until its first suspension. The
// group keeps the frame while the task is suspended and frees it as soon as the task finishes.
// Destroying the group destroys every task still suspended; their awaiters clean up (I/O is
// cancelled and reaped, waits are unlinked), so the group must be destroyed before the EventLoop
// its tasks wait on. Not thread-safe: spawn, wait and destruction happen on the loop thread.
//
// A task must not destroy its own group; stop new work and co_await wait() instead.

#include <cstddef>

#include "aio/sync.h"
#include "aio/task.h"

namespace strata::aio {

namespace detail {
struct GroupEntryPromise;
}

class TaskGroup {
 public:
  using WaitAwaiter = detail::WaitAwaiter<TaskGroup>;

  TaskGroup() = default;
  TaskGroup(const TaskGroup&) = delete;
  TaskGroup& operator=(const TaskGroup&) = delete;
  // Destroys the suspended tasks (newest first) and then wakes any wait()ers.
  ~TaskGroup();

  // Starts `task` (an invalid task is ignored). Returns when it finishes or first suspends.
  void spawn(Task<void> task);
  // Resumes, during a later loop iteration, after the group became empty (at once if it is
  // empty now). Tasks spawned in between do not hold back a waiter that was already woken.
  WaitAwaiter wait() { return WaitAwaiter(*this); }
  // Tasks spawned and not yet finished.
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

 private:
  friend class detail::WaitAwaiter<TaskGroup>;
  friend struct detail::GroupEntryPromise;
  bool try_acquire(detail::WaitNode&) { return size_ == 0; }
  void enqueue(detail::WaitNode& node) { waiters_.push_back(node); }
  void dequeue(detail::WaitNode& node) { waiters_.remove(node); }
  void abandon_wake(detail::WaitNode&) {}

  void link(detail::GroupEntryPromise& entry);
  void unlink(detail::GroupEntryPromise& entry);

  detail::GroupEntryPromise* head_ = nullptr;
  size_t size_ = 0;
  detail::WaitList waiters_;
};

}  // namespace strata::aio
