#pragma once
// Coroutine synchronisation for coroutines that share one EventLoop: CoMutex, CoRwLock, CoQueue,
// Event and Latch. None of them is thread-safe; every user runs on the same loop thread.
//
// Loop: a waiter records EventLoop::current() when it suspends and is resumed with that loop's
// schedule(), never recursively from the call that releases it (unlock, notify, set). Awaiting a
// primitive that is not immediately available outside a running loop aborts.
//
// Memory: a waiter is an intrusive list node inside the awaiter, which lives in the waiting
// coroutine's frame; waiting allocates nothing.
//
// Lifetime: a frame suspended in any wait may be destroyed at any time. Its awaiter unlinks itself
// from the wait list or, if it was already woken, withdraws its resumption from the loop and passes
// on what it was given (a CoMutex or CoRwLock hand-off is released, a CoQueue::notify_one goes to
// the next waiter). A primitive must outlive the coroutines waiting on it.

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "aio/event_loop.h"

namespace strata::aio {

namespace detail {

// One suspended coroutine on one primitive's wait list.
struct WaitNode {
  enum class State : uint8_t {
    kIdle,       // not waiting (before suspending or after resuming)
    kQueued,     // on the primitive's wait list
    kScheduled,  // taken off the list and handed to loop->schedule(); not yet resumed
  };
  WaitNode* prev = nullptr;
  WaitNode* next = nullptr;
  std::coroutine_handle<> handle;
  EventLoop* loop = nullptr;
  State state = State::kIdle;
  bool exclusive = false;     // CoRwLock: waits for write access
  bool woken_singly = false;  // CoQueue: woken by notify_one (passed on if the frame dies)

  // Records the waiting coroutine and the loop it runs on (aborts outside a running loop).
  void suspend(std::coroutine_handle<> waiting);
  // Resumes the waiter during a later iteration of its loop.
  void wake() {
    state = State::kScheduled;
    loop->schedule(handle);
  }
  // The frame is being destroyed after wake(): the loop must not resume it.
  void withdraw() {
    loop->unschedule(handle);
    state = State::kIdle;
  }
};

// FIFO of WaitNodes; O(1) push, pop and remove.
class WaitList {
 public:
  bool empty() const { return head_ == nullptr; }
  WaitNode* front() const { return head_; }
  void push_back(WaitNode& node);
  WaitNode* pop_front();
  void remove(WaitNode& node);
  // Wakes every waiter in order.
  void wake_all();

 private:
  WaitNode* head_ = nullptr;
  WaitNode* tail_ = nullptr;
};

// The awaiter of every wait. `Owner` supplies, as private members befriending this class:
//   bool try_acquire(WaitNode&)      - await_ready: take what the waiter wants if available now
//   void enqueue(WaitNode&)          - append the suspended waiter to the owner's list
//   void dequeue(WaitNode&)          - a queued waiter's frame is destroyed
//   void abandon_wake(WaitNode&)     - a woken waiter's frame is destroyed before it resumed
template <typename Owner>
class WaitAwaiter {
 public:
  explicit WaitAwaiter(Owner& owner, bool exclusive = false) : owner_(owner) {
    node_.exclusive = exclusive;
  }
  WaitAwaiter(const WaitAwaiter&) = delete;
  WaitAwaiter& operator=(const WaitAwaiter&) = delete;
  ~WaitAwaiter() {
    if (node_.state == WaitNode::State::kQueued) {
      owner_.dequeue(node_);
    } else if (node_.state == WaitNode::State::kScheduled) {
      node_.withdraw();
      owner_.abandon_wake(node_);
    }
  }

  bool await_ready() { return owner_.try_acquire(node_); }
  void await_suspend(std::coroutine_handle<> waiting) {
    node_.suspend(waiting);
    owner_.enqueue(node_);
  }
  void await_resume() noexcept { node_.state = WaitNode::State::kIdle; }

 protected:
  Owner& owner_;
  WaitNode node_;
};

// A WaitAwaiter whose co_await yields a guard over what was acquired.
template <typename Owner, typename Guard>
class GuardAwaiter : public WaitAwaiter<Owner> {
 public:
  using WaitAwaiter<Owner>::WaitAwaiter;
  Guard await_resume() noexcept {
    WaitAwaiter<Owner>::await_resume();
    return Guard(this->owner_);
  }
};

}  // namespace detail

// Mutual exclusion between coroutines. Waiters acquire in FIFO order; unlock() hands ownership
// straight to the first waiter (the mutex stays locked meanwhile, so try_lock cannot barge in).
class CoMutex {
 public:
  // Releases the mutex when it goes out of scope (unless released earlier with unlock()).
  class [[nodiscard]] Guard {
   public:
    explicit Guard(CoMutex& mutex) : mutex_(&mutex) {}
    Guard(Guard&& other) noexcept : mutex_(std::exchange(other.mutex_, nullptr)) {}
    Guard& operator=(Guard&& other) noexcept;
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    ~Guard() { unlock(); }
    void unlock();
    bool owns_lock() const { return mutex_ != nullptr; }

   private:
    CoMutex* mutex_;
  };
  using LockAwaiter = detail::WaitAwaiter<CoMutex>;
  using ScopedLockAwaiter = detail::GuardAwaiter<CoMutex, Guard>;

  CoMutex() = default;
  CoMutex(const CoMutex&) = delete;
  CoMutex& operator=(const CoMutex&) = delete;

  // `co_await m.lock();` returns owning the mutex.
  LockAwaiter lock() { return LockAwaiter(*this); }
  // `auto guard = co_await m.scoped_lock();`
  ScopedLockAwaiter scoped_lock() { return ScopedLockAwaiter(*this); }
  // Takes the mutex if it is free (never while ownership is being handed to a waiter).
  bool try_lock();
  // Must be called by the owner. Hands the mutex to the first waiter, which resumes during a
  // later loop iteration, or frees it.
  void unlock();
  bool locked() const { return locked_; }

 private:
  friend class detail::WaitAwaiter<CoMutex>;
  bool try_acquire(detail::WaitNode&) { return try_lock(); }
  void enqueue(detail::WaitNode& node) { waiters_.push_back(node); }
  void dequeue(detail::WaitNode& node) { waiters_.remove(node); }
  void abandon_wake(detail::WaitNode&) { unlock(); }

  bool locked_ = false;
  detail::WaitList waiters_;
};

// Reader-writer lock between coroutines. Strict FIFO: once a writer waits, later readers queue
// behind it, so writers never starve; consecutive readers at the head of the queue are admitted
// together.
class CoRwLock {
 public:
  class [[nodiscard]] ReadGuard {
   public:
    explicit ReadGuard(CoRwLock& lock) : lock_(&lock) {}
    ReadGuard(ReadGuard&& other) noexcept : lock_(std::exchange(other.lock_, nullptr)) {}
    ReadGuard(const ReadGuard&) = delete;
    ReadGuard& operator=(const ReadGuard&) = delete;
    ReadGuard& operator=(ReadGuard&&) = delete;
    ~ReadGuard() { unlock(); }
    void unlock();

   private:
    CoRwLock* lock_;
  };
  class [[nodiscard]] WriteGuard {
   public:
    explicit WriteGuard(CoRwLock& lock) : lock_(&lock) {}
    WriteGuard(WriteGuard&& other) noexcept : lock_(std::exchange(other.lock_, nullptr)) {}
    WriteGuard(const WriteGuard&) = delete;
    WriteGuard& operator=(const WriteGuard&) = delete;
    WriteGuard& operator=(WriteGuard&&) = delete;
    ~WriteGuard() { unlock(); }
    void unlock();

   private:
    CoRwLock* lock_;
  };
  using LockAwaiter = detail::WaitAwaiter<CoRwLock>;
  using ScopedReadAwaiter = detail::GuardAwaiter<CoRwLock, ReadGuard>;
  using ScopedWriteAwaiter = detail::GuardAwaiter<CoRwLock, WriteGuard>;

  CoRwLock() = default;
  CoRwLock(const CoRwLock&) = delete;
  CoRwLock& operator=(const CoRwLock&) = delete;

  LockAwaiter read_lock() { return LockAwaiter(*this, false); }
  LockAwaiter write_lock() { return LockAwaiter(*this, true); }
  ScopedReadAwaiter scoped_read_lock() { return ScopedReadAwaiter(*this, false); }
  ScopedWriteAwaiter scoped_write_lock() { return ScopedWriteAwaiter(*this, true); }
  // Succeed only when nobody is queued (FIFO holds for try_ too).
  bool try_read_lock();
  bool try_write_lock();
  void unlock_read();
  void unlock_write();

  size_t readers() const { return readers_; }
  bool write_locked() const { return writer_; }

 private:
  friend class detail::WaitAwaiter<CoRwLock>;
  bool try_acquire(detail::WaitNode& node) {
    return node.exclusive ? try_write_lock() : try_read_lock();
  }
  void enqueue(detail::WaitNode& node) { waiters_.push_back(node); }
  // A waiter that left the head of the queue may have been holding back readers.
  void dequeue(detail::WaitNode& node) {
    waiters_.remove(node);
    admit_waiters();
  }
  void abandon_wake(detail::WaitNode& node) {
    if (node.exclusive) {
      unlock_write();
    } else {
      unlock_read();
    }
  }
  // Grants the lock to waiters at the head of the queue while they are compatible.
  void admit_waiters();

  size_t readers_ = 0;
  bool writer_ = false;
  detail::WaitList waiters_;
};

// A wait queue (condition-variable style): wait() always suspends until notified. The usual
// pattern with a CoMutex is `m.unlock(); co_await q.wait(); co_await m.lock();`, which cannot miss
// a notification because nothing else runs between unlock() and the suspension.
class CoQueue {
 public:
  using WaitAwaiter = detail::WaitAwaiter<CoQueue>;

  CoQueue() = default;
  CoQueue(const CoQueue&) = delete;
  CoQueue& operator=(const CoQueue&) = delete;

  WaitAwaiter wait() { return WaitAwaiter(*this); }
  // Wakes the longest waiter; false if nobody waits.
  bool notify_one();
  // Wakes every current waiter, in order.
  void notify_all() { waiters_.wake_all(); }
  // True if nobody waits (woken waiters that have not run yet no longer count).
  bool empty() const { return waiters_.empty(); }

 private:
  friend class detail::WaitAwaiter<CoQueue>;
  bool try_acquire(detail::WaitNode&) { return false; }
  void enqueue(detail::WaitNode& node) { waiters_.push_back(node); }
  void dequeue(detail::WaitNode& node) { waiters_.remove(node); }
  void abandon_wake(detail::WaitNode& node) {
    if (node.woken_singly) {
      notify_one();
    }
  }

  detail::WaitList waiters_;
};

// Manual-reset event: wait() returns at once while set; set() wakes every waiter.
class Event {
 public:
  using WaitAwaiter = detail::WaitAwaiter<Event>;

  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  WaitAwaiter wait() { return WaitAwaiter(*this); }
  void set();
  void reset() { set_ = false; }
  bool is_set() const { return set_; }

 private:
  friend class detail::WaitAwaiter<Event>;
  bool try_acquire(detail::WaitNode&) { return set_; }
  void enqueue(detail::WaitNode& node) { waiters_.push_back(node); }
  void dequeue(detail::WaitNode& node) { waiters_.remove(node); }
  void abandon_wake(detail::WaitNode&) {}

  bool set_ = false;
  detail::WaitList waiters_;
};

// Single-use countdown: wait() returns once count_down() has been called `count` times (at once
// if `count` is 0). Counting down past zero is ignored.
class Latch {
 public:
  using WaitAwaiter = detail::WaitAwaiter<Latch>;

  explicit Latch(size_t count) : count_(count) {}
  Latch(const Latch&) = delete;
  Latch& operator=(const Latch&) = delete;

  WaitAwaiter wait() { return WaitAwaiter(*this); }
  void count_down(size_t n = 1);
  size_t count() const { return count_; }

 private:
  friend class detail::WaitAwaiter<Latch>;
  bool try_acquire(detail::WaitNode&) { return count_ == 0; }
  void enqueue(detail::WaitNode& node) { waiters_.push_back(node); }
  void dequeue(detail::WaitNode& node) { waiters_.remove(node); }
  void abandon_wake(detail::WaitNode&) {}

  size_t count_;
  detail::WaitList waiters_;
};

}  // namespace strata::aio
