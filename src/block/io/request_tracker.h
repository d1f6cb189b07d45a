#pragma once
// RequestTracker: the request layer's per-node bookkeeping (QEMU's bs->tracked_requests,
// bs->in_flight, bs->quiesce_counter and the old before-write notifier list).
//
// - In-flight tracking: every data request of a node is a TrackedRequest for its duration. A
//   serialising request waits until no overlapping request is in flight and makes overlapping
//   requests that start later wait for it; an ordinary request waits only for overlapping
//   serialising ones (QEMU's bdrv_wait_serialising_requests).
// - Gate: counts requests in flight. While a drain is active (drain_begin/drain_end, nestable), new
//   requests wait before they enter the gate.
// - Write notifiers: awaited in registration order before a write, write-zeroes or discard reaches
//   the driver, after serialisation.
//
// Threading: a node's requests all run on its home loop, so nothing here takes a lock. Wake-ups
// resume waiters directly (not through the loop), after the tracker's state is consistent.
//
// Owned by Node (created in its constructor); only block/io manipulates it. Graph code may read
// in_flight() and quiesced() for assertions.

#include <coroutine>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "aio/task.h"
#include "base/result.h"

namespace strata::block {

class Node;
struct RequestTracker;

// Extra bits in the `flags` a write notifier receives, next to the request's own RequestFlags.
enum WriteNotifierFlags : uint32_t {
  kNotifyWriteZeroes = 1u << 24,  // the range is being zeroed (write-zeroes)
  kNotifyDiscard = 1u << 25,      // the range is being discarded (reads may return anything)
};

// Called before every write, write-zeroes and discard reaches the driver, once per request, with
// the guest-visible range it changes (the caller's range, not the aligned one an RMW writes back;
// for discard, the part that is actually discarded). An error fails the request without reaching
// the driver. A notifier may read the node with kRequestNoSerialising (the range has not changed
// yet); it must not write to the node.
using WriteNotifier = std::function<aio::Task<Result<void>>(Node& node, uint64_t offset,
                                                            uint64_t bytes, uint32_t flags)>;

namespace io {

// An intrusive FIFO of suspended coroutines. Waiters unlink themselves when their frame is
// destroyed; notify_all() resumes every coroutine waiting at the time of the call, directly.
class WaitQueue {
 public:
  struct Link {
    Link* prev = this;
    Link* next = this;
    std::coroutine_handle<> handle;
    bool linked() const { return next != this; }
    void unlink() {
      prev->next = next;
      next->prev = prev;
      prev = next = this;
    }
  };

  WaitQueue() = default;
  WaitQueue(const WaitQueue&) = delete;
  WaitQueue& operator=(const WaitQueue&) = delete;
  // Waiters still queued stay suspended; their owners must destroy them (no dangling links).
  ~WaitQueue() {
    while (head_.linked()) {
      head_.next->unlink();
    }
  }

  struct Awaiter : Link {
    WaitQueue& queue;
    explicit Awaiter(WaitQueue& q) : queue(q) {}
    Awaiter(const Awaiter&) = delete;
    Awaiter& operator=(const Awaiter&) = delete;
    ~Awaiter() {
      if (linked()) {
        unlink();
      }
    }
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) noexcept {
      handle = h;
      queue.push_back(this);
    }
    void await_resume() const noexcept {}
  };
  // Suspends until the next notify_all().
  Awaiter wait() { return Awaiter(*this); }

  bool empty() const { return !head_.linked(); }
  void notify_all();

 private:
  void push_back(Link* node) {
    node->prev = head_.prev;
    node->next = &head_;
    head_.prev->next = node;
    head_.prev = node;
  }
  Link head_;
};

enum class RequestType : uint8_t { kRead, kWrite, kDiscard, kTruncate };

// One request in flight on a node; lives in the request's coroutine frame. Construction links it
// into the tracker, destruction unlinks it and wakes the requests waiting for it.
struct TrackedRequest {
  TrackedRequest(RequestTracker& tracker, uint64_t offset, uint64_t bytes, RequestType type,
                 bool serialising, uint64_t overlap_offset, uint64_t overlap_bytes);
  ~TrackedRequest();
  TrackedRequest(const TrackedRequest&) = delete;
  TrackedRequest& operator=(const TrackedRequest&) = delete;

  RequestTracker& tracker;
  uint64_t offset;
  uint64_t bytes;
  RequestType type;
  const bool serialising;  // fixed for the request's life: the tracker counts serialising ones
  // The range other requests are checked against (the request's range after alignment).
  uint64_t overlap_offset;
  uint64_t overlap_bytes;
  // The request this one is suspended on, for QEMU's "already waiting for us" deadlock check.
  TrackedRequest* waiting_for = nullptr;
  WaitQueue waiters;
  TrackedRequest* prev = nullptr;
  TrackedRequest* next = nullptr;

  bool overlaps(uint64_t other_offset, uint64_t other_bytes) const {
    return other_offset < overlap_offset + overlap_bytes &&
           overlap_offset < other_offset + other_bytes;
  }
};

// Waits until no request conflicts with `request`: if it is serialising, every overlapping request
// in flight; otherwise every overlapping serialising one. Requests already waiting for `request`
// are skipped (they will wait for it instead). Returns whether it had to wait.
aio::Task<bool> wait_serialising(TrackedRequest& request);
// False when wait_serialising(request) would return at once without waiting: nothing else is in
// flight for a serialising request, or no serialising request is in flight for an ordinary one.
// Lets the hot path skip the scan and the coroutine (defined after RequestTracker).
inline bool may_wait_serialising(const TrackedRequest& request);

}  // namespace io

struct RequestTracker {
  RequestTracker() = default;
  RequestTracker(const RequestTracker&) = delete;
  RequestTracker& operator=(const RequestTracker&) = delete;
  ~RequestTracker();

  // ---- gate --------------------------------------------------------------------------------
  uint64_t in_flight() const { return in_flight_; }
  bool quiesced() const { return quiesce_counter_ > 0; }
  // Suspends while a drain is active; returns when a new request may enter the gate.
  aio::Task<void> wait_until_unquiesced();
  // RAII: one request in flight. The destructor wakes drainers when the count drops to zero.
  class InFlight {
   public:
    explicit InFlight(RequestTracker& tracker) : tracker_(tracker) { ++tracker_.in_flight_; }
    ~InFlight();
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;

   private:
    RequestTracker& tracker_;
  };
  // Suspends until in_flight() is zero (returns at once if it is).
  aio::Task<void> wait_idle();
  void quiesce_begin() { ++quiesce_counter_; }
  void quiesce_end();

  // ---- tracked requests --------------------------------------------------------------------
  io::TrackedRequest* first_request() const { return head_; }
  size_t tracked_count() const { return tracked_count_; }
  size_t serialising_count() const { return serialising_count_; }

  // ---- write notifiers ---------------------------------------------------------------------
  using NotifierId = uint64_t;
  NotifierId add_write_notifier(WriteNotifier notifier);
  // Removing an id that is not registered does nothing. A notifier running at the time finishes.
  void remove_write_notifier(NotifierId id);
  bool has_write_notifiers() const { return !notifiers_.empty(); }
  // Runs the notifiers in order; stops at and returns the first error.
  aio::Task<Result<void>> notify_write(Node& node, uint64_t offset, uint64_t bytes, uint32_t flags);

  // ---- flush bookkeeping (QEMU's write_gen / flushed_gen / active_flush_req) ---------------
  uint64_t write_generation = 0;    // bumped by every completed write, discard, truncate
  uint64_t flushed_generation = 0;  // write_generation that the last successful flush covered
  bool flush_active = false;
  io::WaitQueue flush_queue;

 private:
  friend struct io::TrackedRequest;

  uint64_t in_flight_ = 0;
  uint64_t quiesce_counter_ = 0;
  io::WaitQueue quiesce_queue_;  // requests waiting for the drain to end
  io::WaitQueue idle_queue_;     // drainers waiting for in_flight_ to reach zero

  io::TrackedRequest* head_ = nullptr;
  io::TrackedRequest* tail_ = nullptr;
  size_t tracked_count_ = 0;
  size_t serialising_count_ = 0;  // tracked requests with `serialising` set

  struct NotifierEntry {
    NotifierId id;
    std::shared_ptr<WriteNotifier> notifier;
  };
  std::vector<NotifierEntry> notifiers_;
  NotifierId next_notifier_id_ = 1;
};

namespace io {
inline bool may_wait_serialising(const TrackedRequest& request) {
  return request.serialising ? request.tracker.tracked_count() > 1
                             : request.tracker.serialising_count() > 0;
}
}  // namespace io

}  // namespace strata::block
