#include "aio/task_group.h"

#include <exception>
#include <utility>

namespace strata::aio {

namespace detail {

// The group's own coroutine around each spawned task: it awaits the task and, at its final
// suspension, unlinks itself and frees its frame (and with it the task's).
struct GroupEntry {
  using promise_type = GroupEntryPromise;
  std::coroutine_handle<GroupEntryPromise> handle;
};

struct GroupEntryPromise {
  TaskGroup* group = nullptr;
  GroupEntryPromise* prev = nullptr;
  GroupEntryPromise* next = nullptr;

  GroupEntry get_return_object() noexcept {
    return GroupEntry{std::coroutine_handle<GroupEntryPromise>::from_promise(*this)};
  }
  std::suspend_always initial_suspend() noexcept { return {}; }

  struct Final {
    bool await_ready() noexcept { return false; }
    void await_suspend(std::coroutine_handle<GroupEntryPromise> self) noexcept {
      TaskGroup* group = self.promise().group;
      group->unlink(self.promise());
      self.destroy();
      if (group->empty()) {
        group->waiters_.wake_all();
      }
    }
    void await_resume() noexcept {}
  };
  Final final_suspend() noexcept { return {}; }
  void return_void() noexcept {}
  [[noreturn]] void unhandled_exception() noexcept { std::terminate(); }
};

namespace {
GroupEntry run_entry(Task<void> task) {
  co_await task;
}
}  // namespace

}  // namespace detail

TaskGroup::~TaskGroup() {
  // Destroying one task may finish nothing but may wake or destroy others; take one at a time.
  while (head_ != nullptr) {
    detail::GroupEntryPromise& entry = *head_;
    unlink(entry);
    std::coroutine_handle<detail::GroupEntryPromise>::from_promise(entry).destroy();
  }
  waiters_.wake_all();
}

void TaskGroup::spawn(Task<void> task) {
  if (!task.valid()) {
    return;
  }
  detail::GroupEntry entry = detail::run_entry(std::move(task));
  entry.handle.promise().group = this;
  link(entry.handle.promise());
  entry.handle.resume();
}

void TaskGroup::link(detail::GroupEntryPromise& entry) {
  entry.prev = nullptr;
  entry.next = head_;
  if (head_ != nullptr) {
    head_->prev = &entry;
  }
  head_ = &entry;
  ++size_;
}

void TaskGroup::unlink(detail::GroupEntryPromise& entry) {
  if (entry.prev != nullptr) {
    entry.prev->next = entry.next;
  } else {
    head_ = entry.next;
  }
  if (entry.next != nullptr) {
    entry.next->prev = entry.prev;
  }
  entry.prev = nullptr;
  entry.next = nullptr;
  --size_;
}

}  // namespace strata::aio
