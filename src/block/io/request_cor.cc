// Copy-on-read in the request layer (QEMU's bdrv_co_do_copy_on_readv), used by the copy-on-read
// filter and by block-stream. The range is widened to whole clusters of the node and held as one
// serialising request, so no guest write overlaps a copy: a write waits until the copy is in the
// node, and a copy that starts after a write sees that part allocated and leaves it alone.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "block/io/bounce_buffer.h"
#include "block/io/request.h"
#include "block/io/request_internal.h"
#include "block/io/request_tracker.h"

namespace strata::block::io::detail {

namespace {

// Granularity of copies for nodes that report no cluster size (QEMU uses 64 KiB too).
constexpr uint64_t kDefaultCopyGranularity = 64 << 10;

bool is_zero(const char* data, uint64_t bytes) {
  return bytes == 0 || (data[0] == 0 && std::memcmp(data, data + 1, bytes - 1) == 0);
}

}  // namespace

aio::Task<Result<void>> copy_on_read(Node& node, uint64_t offset, IoVector qiov, bool prefetch) {
  const uint64_t bytes = qiov.size();
  const uint64_t granularity = std::max<uint64_t>(
      node.cluster_size().value_or(kDefaultCopyGranularity), request_alignment(node));
  const uint64_t start = round_down(offset, granularity);
  const uint64_t end = std::min<uint64_t>(round_up(offset + bytes, granularity), node.length());
  RequestTracker& tracker = node.requests();
  if (tracker.quiesced()) {
    co_await tracker.wait_until_unquiesced();
  }
  RequestTracker::InFlight in_flight(tracker);
  TrackedRequest request(tracker, start, end - start, RequestType::kRead, /*serialising=*/true,
                         start, end - start);
  if (may_wait_serialising(request)) {
    bool waited = co_await wait_serialising(request);
    (void)waited;
  }
  const bool can_copy = node.is_writable();
  uint64_t chunk = bounce_chunk_bytes(node);
  // A prefetch (block-stream) may stage the data in the caller's own buffer when it is one
  // page-aligned piece covering the whole range: nobody else sees that buffer. Otherwise a
  // page-aligned bounce buffer, so that O_DIRECT files below need no second one.
  char* staging = nullptr;
  BounceBuffer bounce;
  const iovec* first = qiov.data();
  if (prefetch && qiov.count() == 1 && start == offset && end - start <= qiov.size() &&
      reinterpret_cast<uintptr_t>(first->iov_base) % 4096 == 0) {
    staging = static_cast<char*>(first->iov_base);
    chunk = end - start;
  } else {
    Result<BounceBuffer> buffer = BounceBuffer::allocate(
        std::min(chunk, end - start), std::max<size_t>(node.limits().memory_alignment, 4096));
    if (!buffer) {
      co_return buffer.error();
    }
    bounce = std::move(buffer).value();
    staging = bounce.data();
  }
  for (uint64_t pos = start; pos < end;) {
    Result<BlockStatus> status = co_await node.co_block_status(pos, end - pos);
    if (!status) {
      co_return status.error();
    }
    const uint64_t run = std::min(std::max<uint64_t>(status->bytes, 1), end - pos);
    const bool copy = can_copy && !status->allocated_here();
    if (prefetch && !copy) {
      pos += run;
      continue;
    }
    for (uint64_t at = pos; at < pos + run;) {
      const uint64_t len = std::min(chunk, pos + run - at);
      char* data = staging;
      Result<void> done = co_await driver_preadv(node, at, IoVector(data, len), 0);
      if (done && copy) {
        if (is_zero(data, len)) {
          done = co_await node.co_pwrite_zeroes(at, len, 0);
          if (!done && is_not_supported(done.error())) {
            done = co_await driver_pwritev(node, at, IoVector(data, len), 0);
          }
        } else {
          done = co_await driver_pwritev(node, at, IoVector(data, len), 0);
        }
        write_finished(node, at, len);
      }
      if (!done) {
        co_return done;
      }
      const uint64_t copy_start = std::max(at, offset);
      const uint64_t copy_end = std::min(at + len, offset + bytes);
      if (!prefetch && copy_start < copy_end) {
        qiov.copy_from(copy_start - offset, data + (copy_start - at), copy_end - copy_start);
      }
      at += len;
    }
    pos += run;
  }
  co_return ok();
}

}  // namespace strata::block::io::detail
