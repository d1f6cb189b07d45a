#include "aio/sync.h"

#include <cstdio>
#include <cstdlib>

namespace strata::aio {

namespace detail {

void WaitNode::suspend(std::coroutine_handle<> waiting) {
  loop = EventLoop::current();
  if (loop == nullptr) {
    std::fputs("strata: coroutine primitive awaited outside a running EventLoop\n", stderr);
    std::abort();
  }
  handle = waiting;
  woken_singly = false;
}

void WaitList::push_back(WaitNode& node) {
  node.prev = tail_;
  node.next = nullptr;
  if (tail_ != nullptr) {
    tail_->next = &node;
  } else {
    head_ = &node;
  }
  tail_ = &node;
  node.state = WaitNode::State::kQueued;
}

WaitNode* WaitList::pop_front() {
  WaitNode* node = head_;
  if (node != nullptr) {
    remove(*node);
  }
  return node;
}

void WaitList::remove(WaitNode& node) {
  if (node.prev != nullptr) {
    node.prev->next = node.next;
  } else {
    head_ = node.next;
  }
  if (node.next != nullptr) {
    node.next->prev = node.prev;
  } else {
    tail_ = node.prev;
  }
  node.prev = nullptr;
  node.next = nullptr;
  node.state = WaitNode::State::kIdle;
}

void WaitList::wake_all() {
  while (WaitNode* node = pop_front()) {
    node->wake();
  }
}

}  // namespace detail

CoMutex::Guard& CoMutex::Guard::operator=(Guard&& other) noexcept {
  if (this != &other) {
    unlock();
    mutex_ = std::exchange(other.mutex_, nullptr);
  }
  return *this;
}

void CoMutex::Guard::unlock() {
  if (mutex_ != nullptr) {
    std::exchange(mutex_, nullptr)->unlock();
  }
}

bool CoMutex::try_lock() {
  if (locked_) {
    return false;
  }
  locked_ = true;
  return true;
}

void CoMutex::unlock() {
  if (detail::WaitNode* next = waiters_.pop_front()) {
    next->wake();  // ownership passes to `next`; locked_ stays true
  } else {
    locked_ = false;
  }
}

void CoRwLock::ReadGuard::unlock() {
  if (lock_ != nullptr) {
    std::exchange(lock_, nullptr)->unlock_read();
  }
}

void CoRwLock::WriteGuard::unlock() {
  if (lock_ != nullptr) {
    std::exchange(lock_, nullptr)->unlock_write();
  }
}

bool CoRwLock::try_read_lock() {
  if (writer_ || !waiters_.empty()) {
    return false;
  }
  ++readers_;
  return true;
}

bool CoRwLock::try_write_lock() {
  if (writer_ || readers_ > 0 || !waiters_.empty()) {
    return false;
  }
  writer_ = true;
  return true;
}

void CoRwLock::unlock_read() {
  --readers_;
  if (readers_ == 0) {
    admit_waiters();
  }
}

void CoRwLock::unlock_write() {
  writer_ = false;
  admit_waiters();
}

void CoRwLock::admit_waiters() {
  while (!writer_ && !waiters_.empty()) {
    detail::WaitNode* next = waiters_.front();
    if (next->exclusive) {
      if (readers_ == 0) {
        waiters_.pop_front();
        writer_ = true;
        next->wake();
      }
      return;
    }
    waiters_.pop_front();
    ++readers_;
    next->wake();
  }
}

bool CoQueue::notify_one() {
  detail::WaitNode* next = waiters_.pop_front();
  if (next == nullptr) {
    return false;
  }
  next->woken_singly = true;
  next->wake();
  return true;
}

void Event::set() {
  set_ = true;
  waiters_.wake_all();
}

void Latch::count_down(size_t n) {
  if (count_ == 0) {
    return;
  }
  count_ -= n < count_ ? n : count_;
  if (count_ == 0) {
    waiters_.wake_all();
  }
}

}  // namespace strata::aio
