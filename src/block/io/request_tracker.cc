#include "block/io/request_tracker.h"

#include <algorithm>
#include <utility>

namespace strata::block {

namespace io {

void WaitQueue::notify_all() {
  if (empty()) {
    return;
  }
  // Move the current waiters to a local list first: a resumed coroutine may wait on this queue
  // again (it must not be resumed twice by this call), and a waiter whose frame is destroyed while
  // another one runs unlinks itself from the local list.
  Link pending;
  pending.next = head_.next;
  pending.prev = head_.prev;
  pending.next->prev = &pending;
  pending.prev->next = &pending;
  head_.next = head_.prev = &head_;
  while (pending.linked()) {
    Link* waiter = pending.next;
    waiter->unlink();
    waiter->handle.resume();
  }
}

TrackedRequest::TrackedRequest(RequestTracker& tracker_in, uint64_t offset_in, uint64_t bytes_in,
                               RequestType type_in, bool serialising_in, uint64_t overlap_offset_in,
                               uint64_t overlap_bytes_in)
    : tracker(tracker_in),
      offset(offset_in),
      bytes(bytes_in),
      type(type_in),
      serialising(serialising_in),
      overlap_offset(overlap_offset_in),
      overlap_bytes(overlap_bytes_in) {
  prev = tracker.tail_;
  if (tracker.tail_ != nullptr) {
    tracker.tail_->next = this;
  } else {
    tracker.head_ = this;
  }
  tracker.tail_ = this;
  ++tracker.tracked_count_;
  if (serialising) {
    ++tracker.serialising_count_;
  }
}

TrackedRequest::~TrackedRequest() {
  if (prev != nullptr) {
    prev->next = next;
  } else {
    tracker.head_ = next;
  }
  if (next != nullptr) {
    next->prev = prev;
  } else {
    tracker.tail_ = prev;
  }
  --tracker.tracked_count_;
  if (serialising) {
    --tracker.serialising_count_;
  }
  // The tracker no longer lists this request; waiters re-scan when they resume.
  waiters.notify_all();
}

namespace {

TrackedRequest* find_conflict(TrackedRequest& self) {
  for (TrackedRequest* other = self.tracker.first_request(); other != nullptr;
       other = other->next) {
    if (other == &self || (!other->serialising && !self.serialising)) {
      continue;
    }
    if (!other->overlaps(self.overlap_offset, self.overlap_bytes)) {
      continue;
    }
    // QEMU: if `other` is already (indirectly) waiting for us, or will wait for us as soon as it
    // wakes up, go on instead of deadlocking.
    if (other->waiting_for == &self) {
      continue;
    }
    return other;
  }
  return nullptr;
}

}  // namespace

aio::Task<bool> wait_serialising(TrackedRequest& request) {
  bool waited = false;
  while (true) {
    TrackedRequest* conflict = find_conflict(request);
    if (conflict == nullptr) {
      break;
    }
    waited = true;
    request.waiting_for = conflict;
    co_await conflict->waiters.wait();
    request.waiting_for = nullptr;
  }
  co_return waited;
}

}  // namespace io

RequestTracker::~RequestTracker() = default;

RequestTracker::InFlight::~InFlight() {
  if (--tracker_.in_flight_ == 0) {
    tracker_.idle_queue_.notify_all();
  }
}

aio::Task<void> RequestTracker::wait_until_unquiesced() {
  while (quiesce_counter_ > 0) {
    co_await quiesce_queue_.wait();
  }
}

aio::Task<void> RequestTracker::wait_idle() {
  while (in_flight_ > 0) {
    co_await idle_queue_.wait();
  }
}

void RequestTracker::quiesce_end() {
  if (quiesce_counter_ == 0) {
    return;
  }
  if (--quiesce_counter_ == 0) {
    quiesce_queue_.notify_all();
  }
}

RequestTracker::NotifierId RequestTracker::add_write_notifier(WriteNotifier notifier) {
  NotifierId id = next_notifier_id_++;
  notifiers_.push_back(NotifierEntry{id, std::make_shared<WriteNotifier>(std::move(notifier))});
  return id;
}

void RequestTracker::remove_write_notifier(NotifierId id) {
  std::erase_if(notifiers_, [id](const NotifierEntry& entry) { return entry.id == id; });
}

aio::Task<Result<void>> RequestTracker::notify_write(Node& node, uint64_t offset, uint64_t bytes,
                                                     uint32_t flags) {
  if (notifiers_.empty()) {
    co_return ok();
  }
  // A snapshot: notifiers added or removed while one runs take effect from the next request; the
  // shared_ptr keeps a removed notifier alive until its call returns.
  std::vector<NotifierEntry> snapshot = notifiers_;
  for (const NotifierEntry& entry : snapshot) {
    aio::Task<Result<void>> call = (*entry.notifier)(node, offset, bytes, flags);
    Result<void> result = co_await call;
    if (!result) {
      co_return result;
    }
  }
  co_return ok();
}

}  // namespace strata::block
