// Requests other than data reads and writes: flush, discard, block status, truncate, and drain
// (QEMU's bdrv_co_flush, bdrv_co_pdiscard, bdrv_co_block_status, bdrv_co_truncate,
// bdrv_drained_begin/end).

#include <algorithm>
#include <cerrno>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "aio/event_loop.h"
#include "block/drivers/blkdebug/events.h"
#include "block/io/request.h"
#include "block/io/request_internal.h"

namespace strata::block::io {

namespace {

using detail::request_alignment;
using detail::round_down;
using detail::round_up;

// Ends a drained section when the draining frame finishes or is destroyed.
class DrainedSection {
 public:
  explicit DrainedSection(Node& node) : node_(node) { drain_begin(node_); }
  ~DrainedSection() { drain_end(node_); }
  DrainedSection(const DrainedSection&) = delete;
  DrainedSection& operator=(const DrainedSection&) = delete;

 private:
  Node& node_;
};

// Marks a flush as the node's active one; the next queued flush starts when it ends.
class ActiveFlush {
 public:
  explicit ActiveFlush(RequestTracker& tracker) : tracker_(tracker) {
    tracker_.flush_active = true;
  }
  ~ActiveFlush() {
    tracker_.flush_active = false;
    tracker_.flush_queue.notify_all();
  }
  ActiveFlush(const ActiveFlush&) = delete;
  ActiveFlush& operator=(const ActiveFlush&) = delete;

 private:
  RequestTracker& tracker_;
};

// Waits until `node` and its descendants have nothing in flight; returns whether it waited.
aio::Task<bool> wait_subtree_idle(Node& node) {
  bool waited = false;
  if (node.requests().in_flight() > 0) {
    co_await node.requests().wait_idle();
    waited = true;
  }
  std::vector<std::shared_ptr<Node>> children;
  children.reserve(node.children().size());
  for (const auto& child : node.children()) {
    children.push_back(child->node_ref());
  }
  for (const auto& child : children) {
    bool child_waited = co_await wait_subtree_idle(*child);
    waited = waited || child_waited;
  }
  co_return waited;
}

}  // namespace

aio::Task<Result<void>> flush(Node& node) {
  // QEMU: flushing a read-only node does nothing (nothing can be dirty); an inactive node was
  // flushed when it was inactivated.
  if (!node.is_writable()) {
    co_return ok();
  }
  RequestTracker& tracker = node.requests();
  co_await tracker.wait_until_unquiesced();
  RequestTracker::InFlight in_flight(tracker);

  const uint64_t current_generation = tracker.write_generation;
  while (tracker.flush_active) {
    co_await tracker.flush_queue.wait();
  }
  Result<void> result = ok();
  {
    ActiveFlush active(tracker);
    // QEMU's bdrv_co_flush announces flush_to_os always and flush_to_disk when the disk flush is
    // due, both on the node's primary child.
    Child* primary = node.primary_child();
    debug_event(primary, BlkdebugEvent::kFlushToOs);
    if (!node.common_options().cache_no_flush && tracker.flushed_generation != current_generation) {
      debug_event(primary, BlkdebugEvent::kFlushToDisk);
    }
    // A leaf (protocol) node's flush is QEMU's flush_to_disk: skipped when nothing was written
    // since the last one, and with cache.no-flush. Other nodes always write back their caches
    // (QEMU's flush_to_os), since their metadata may change outside the request layer.
    const bool leaf = node.children().empty();
    const bool skip = leaf && (tracker.flushed_generation == current_generation ||
                               node.common_options().cache_no_flush);
    if (!skip) {
      Result<void> flushed = co_await node.co_flush();
      result = std::move(flushed);
    }
    if (result) {
      tracker.flushed_generation = std::max(tracker.flushed_generation, current_generation);
    }
  }

  // Then every child this node may write to (QEMU flushes children after the node itself).
  std::vector<std::shared_ptr<Node>> children;
  for (const auto& child : node.children()) {
    if ((child->perm() & (kPermWrite | kPermWriteUnchanged)) != 0) {
      children.push_back(child->node_ref());
    }
  }
  for (const auto& child : children) {
    Result<void> child_result = co_await flush(*child);
    if (result && !child_result) {
      result = std::move(child_result);
    }
  }
  co_return result;
}

aio::Task<Result<void>> pdiscard(Node& node, uint64_t offset, uint64_t bytes) {
  Result<void> checked = detail::check_data_request(node, offset, bytes, "discard");
  if (checked) {
    checked = detail::check_writable(node);
  }
  if (!checked) {
    co_return checked;
  }
  // QEMU's BDRV_O_UNMAP: with discard=ignore a discard request does nothing.
  if (bytes == 0 || node.common_options().discard != "unmap") {
    co_return ok();
  }
  // Discard is advisory: drop the parts the driver could not address.
  const uint64_t align = request_alignment(node);
  const uint64_t start = round_up(offset, align);
  const uint64_t end = round_down(offset + bytes, align);
  if (start >= end) {
    co_return ok();
  }
  RequestTracker& tracker = node.requests();
  co_await tracker.wait_until_unquiesced();
  RequestTracker::InFlight in_flight(tracker);
  TrackedRequest request(tracker, start, end - start, RequestType::kDiscard, false, start,
                         end - start);
  bool waited = co_await wait_serialising(request);
  (void)waited;
  Result<void> notified = co_await tracker.notify_write(node, start, end - start, kNotifyDiscard);
  if (!notified) {
    co_return notified;
  }

  const NodeLimits& limits = node.limits();
  const uint64_t discard_align =
      std::max<uint64_t>(align, round_up(limits.pdiscard_alignment, align));
  const uint64_t max_discard =
      limits.max_pdiscard != 0
          ? std::max(round_down(limits.max_pdiscard, discard_align), discard_align)
          : round_down(detail::kMaxRequestValue, discard_align);
  uint64_t head = start % discard_align;
  const uint64_t tail = end % discard_align;
  uint64_t pos = start;
  Result<void> result = ok();
  while (pos < end) {
    uint64_t num = end - pos;
    if (head != 0) {
      num = std::min(num, discard_align - head);
      head = (head + num) % discard_align;
    } else if (tail != 0 && num > discard_align) {
      num -= tail;
    }
    num = std::min(num, max_discard);
    Result<void> discarded = co_await node.co_pdiscard(pos, num);
    if (!discarded && !detail::is_not_supported(discarded.error())) {
      result = std::move(discarded);
      break;
    }
    pos += num;
  }
  detail::write_finished(node, start, end - start);
  co_return result;
}

aio::Task<Result<BlockStatus>> block_status(Node& node, uint64_t offset, uint64_t bytes) {
  Result<void> checked = detail::check_range(offset, bytes);
  if (!checked) {
    co_return std::move(checked).error();
  }
  const uint64_t length = node.length();
  if (offset >= length) {
    co_return Error(ErrorKind::kInvalidArgument,
                    "Block status offset " + std::to_string(offset) +
                        " is at or past the end of node '" + node.name() + "' (length " +
                        std::to_string(length) + ")",
                    EINVAL);
  }
  if (bytes == 0) {
    co_return Error(ErrorKind::kInvalidArgument, "Block status of an empty range", EINVAL);
  }
  bytes = std::min(bytes, length - offset);

  RequestTracker& tracker = node.requests();
  co_await tracker.wait_until_unquiesced();
  RequestTracker::InFlight in_flight(tracker);

  const uint64_t align = request_alignment(node);
  const uint64_t aligned_offset = round_down(offset, align);
  const uint64_t aligned_bytes = round_up(offset + bytes, align) - aligned_offset;
  Result<BlockStatus> queried = co_await node.co_block_status(aligned_offset, aligned_bytes);
  if (!queried) {
    co_return queried;
  }
  BlockStatus status = *queried;
  const uint64_t head = offset - aligned_offset;
  if (status.bytes <= head) {
    co_return Error(ErrorKind::kIo,
                    std::string("Driver '") + node.driver_name() +
                        "' returned an empty block status run at offset " +
                        std::to_string(aligned_offset),
                    EIO);
  }
  status.bytes = std::min(status.bytes - head, bytes);
  if ((status.flags & BlockStatus::kOffsetValid) != 0) {
    status.map_offset += head;
  }

  // QEMU's want_zero recursion: a run the driver maps to `file` may read as zeroes there; a driver
  // that does not know (neither kData nor kZero) takes the file's answer.
  if ((status.flags & BlockStatus::kRecurse) != 0 && status.file != nullptr &&
      status.file != &node && (status.flags & BlockStatus::kOffsetValid) != 0 &&
      (status.flags & BlockStatus::kZero) == 0) {
    Node& file = *status.file;
    const bool knows_data = (status.flags & BlockStatus::kData) != 0;
    const uint64_t file_length = file.length();
    if (status.map_offset >= file_length) {
      // Past the end of the file reads as zeroes.
      status.flags |= BlockStatus::kZero;
    } else {
      Result<BlockStatus> inner = co_await block_status(file, status.map_offset, status.bytes);
      if (inner) {
        const bool inner_zero = (inner->flags & BlockStatus::kZero) != 0;
        const bool to_file_end = status.map_offset + inner->bytes >= file_length;
        if (!(inner_zero && to_file_end)) {
          status.bytes = std::min(status.bytes, inner->bytes);
        }
        if (inner_zero) {
          status.flags |= BlockStatus::kZero;
        }
        if (!knows_data) {
          status.flags |= inner->flags & BlockStatus::kData;
        }
      } else if (!knows_data) {
        co_return std::move(inner).error();
      }
    }
  }
  status.flags &= ~static_cast<uint32_t>(BlockStatus::kRecurse);
  if ((status.flags & (BlockStatus::kData | BlockStatus::kZero)) != 0) {
    status.flags |= BlockStatus::kAllocated;
  }
  co_return status;
}

aio::Task<Result<void>> truncate(Node& node, uint64_t new_size, bool exact) {
  if (new_size > detail::kMaxRequestValue) {
    co_return Error(ErrorKind::kInvalidArgument,
                    "Image size " + std::to_string(new_size) + " exceeds the maximum " +
                        std::to_string(detail::kMaxRequestValue),
                    EINVAL);
  }
  Result<void> writable = detail::check_writable(node);
  if (!writable) {
    co_return writable;
  }
  RequestTracker& tracker = node.requests();
  co_await tracker.wait_until_unquiesced();
  RequestTracker::InFlight in_flight(tracker);

  // Serialise against everything between the old and the new end: shrinking must not race with
  // requests to the part that goes away, growing (possibly with preallocation) with writes to the
  // new part.
  const uint64_t old_size = node.length();
  const uint64_t low = std::min(old_size, new_size);
  const uint64_t high = std::max(old_size, new_size);
  TrackedRequest request(tracker, low, high - low, RequestType::kTruncate, high != low, low,
                         high - low);
  bool waited = co_await wait_serialising(request);
  (void)waited;
  Result<void> result = co_await node.co_truncate(new_size, exact);
  ++tracker.write_generation;
  co_return result;
}

aio::Task<void> drain(Node& node) {
  DrainedSection drained(node);
  while (true) {
    bool waited = co_await wait_subtree_idle(node);
    if (!waited) {
      break;
    }
  }
}

void drain_begin(Node& node) {
  node.requests().quiesce_begin();
}

void drain_end(Node& node) {
  node.requests().quiesce_end();
}

RequestTracker::NotifierId add_write_notifier(Node& node, WriteNotifier notifier) {
  return node.requests().add_write_notifier(std::move(notifier));
}

void release_when_idle(std::shared_ptr<Node> node) {
  aio::EventLoop* loop = aio::EventLoop::current();
  if (!node || node->requests().in_flight() == 0 || loop == nullptr) {
    return;
  }
  loop->post([node = std::move(node)]() mutable { release_when_idle(std::move(node)); });
}

void remove_write_notifier(Node& node, RequestTracker::NotifierId id) {
  node.requests().remove_write_notifier(id);
}

}  // namespace strata::block::io
