// Data requests: read, write and write-zeroes (QEMU's bdrv_co_preadv_part, bdrv_co_pwritev_part,
// bdrv_co_do_zero_pwritev, bdrv_co_do_pwrite_zeroes). Flush, discard, block status, truncate and
// drain live in request_misc.cc.

#include "block/io/request.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

#include "block/bitmap/dirty_bitmap.h"
#include "block/io/bounce_buffer.h"
#include "block/io/request_internal.h"

namespace strata::block::io {

namespace detail {

Result<void> check_range(uint64_t offset, uint64_t bytes) {
  if (offset > kMaxRequestValue) {
    return Error(ErrorKind::kInvalidArgument,
                 "Request offset " + std::to_string(offset) + " exceeds the maximum " +
                     std::to_string(kMaxRequestValue),
                 EINVAL);
  }
  if (bytes > kMaxRequestValue) {
    return Error(ErrorKind::kInvalidArgument,
                 "Request length " + std::to_string(bytes) + " exceeds the maximum " +
                     std::to_string(kMaxRequestValue),
                 EINVAL);
  }
  if (offset + bytes > kMaxRequestValue) {
    return Error(ErrorKind::kInvalidArgument,
                 "Request end (offset " + std::to_string(offset) + " + length " +
                     std::to_string(bytes) + ") exceeds the maximum " +
                     std::to_string(kMaxRequestValue),
                 EINVAL);
  }
  return ok();
}

Result<void> check_data_request(const Node& node, uint64_t offset, uint64_t bytes,
                                const char* operation) {
  Result<void> range = check_range(offset, bytes);
  if (!range) {
    return range;
  }
  uint64_t length = node.length();
  if (offset + bytes > length) {
    return Error(ErrorKind::kIo,
                 std::string("Cannot ") + operation + " beyond the end of node '" + node.name() +
                     "' (offset " + std::to_string(offset) + ", length " + std::to_string(bytes) +
                     ", node length " + std::to_string(length) + ")",
                 EIO);
  }
  return ok();
}

Result<void> check_writable(const Node& node) {
  if (!node.is_active()) {
    return Error(ErrorKind::kPermission, "Block node '" + node.name() + "' is inactive", EPERM);
  }
  if (node.is_read_only()) {
    return Error(ErrorKind::kPermission, "Block node is read-only", EPERM);
  }
  return ok();
}

bool is_memory_aligned(const Node& node, const IoVector& qiov) {
  const uint64_t alignment = node.limits().memory_alignment;
  if (alignment <= 1) {
    return true;
  }
  for (const iovec& v : qiov.entries()) {
    if (reinterpret_cast<uintptr_t>(v.iov_base) % alignment != 0 || v.iov_len % alignment != 0) {
      return false;
    }
  }
  return true;
}

uint64_t max_transfer_bytes(const Node& node) {
  const uint64_t align = request_alignment(node);
  const uint64_t max_transfer = node.limits().max_transfer;
  if (max_transfer == 0) {
    return round_down(kMaxRequestValue, align);
  }
  return std::max(round_down(max_transfer, align), align);
}

uint64_t bounce_chunk_bytes(const Node& node) {
  const uint64_t align = request_alignment(node);
  return std::max(round_down(std::min(kMaxBounceBytes, max_transfer_bytes(node)), align), align);
}

namespace {
using DriverTransfer = aio::Task<Result<void>> (Node::*)(uint64_t, uint64_t, IoVector, uint32_t);

// Passes an aligned request to the driver in pieces of at most max_transfer bytes.
aio::Task<Result<void>> driver_transfer(Node& node, DriverTransfer transfer, uint64_t offset,
                                        IoVector qiov, uint32_t flags) {
  const uint64_t max = max_transfer_bytes(node);
  const uint64_t bytes = qiov.size();
  if (bytes <= max) {
    Result<void> result = co_await (node.*transfer)(offset, bytes, std::move(qiov), flags);
    co_return result;
  }
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t len = std::min(max, bytes - done);
    IoVector part = qiov.slice(done, len);
    Result<void> result = co_await (node.*transfer)(offset + done, len, std::move(part), flags);
    if (!result) {
      co_return result;
    }
    done += len;
  }
  co_return ok();
}
}  // namespace

// Plain functions returning the transfer's task: no extra coroutine frame on the data path.
aio::Task<Result<void>> driver_preadv(Node& node, uint64_t offset, IoVector qiov, uint32_t flags) {
  return driver_transfer(node, &Node::co_preadv, offset, std::move(qiov), flags);
}

aio::Task<Result<void>> driver_pwritev(Node& node, uint64_t offset, IoVector qiov, uint32_t flags) {
  return driver_transfer(node, &Node::co_pwritev, offset, std::move(qiov), flags);
}

void write_finished(Node& node, uint64_t offset, uint64_t bytes) {
  ++node.requests().write_generation;
  node.dirty_bitmaps().mark_dirty(offset, bytes);
}

bool is_not_supported(const Error& error) {
  return error.kind() == ErrorKind::kUnsupported ||
         (error.has_errno() && (error.errno_value() == ENOTSUP || error.errno_value() == ENOSYS));
}

}  // namespace detail

namespace {

using detail::request_alignment;
using detail::round_down;
using detail::round_up;

// The aligned superset of a request and which of its ends need read-modify-write.
struct AlignedRange {
  uint64_t align;
  uint64_t offset;  // round_down(request offset)
  uint64_t end;     // round_up(request end)
  bool head_partial;
  bool tail_partial;

  AlignedRange(const Node& node, uint64_t request_offset, uint64_t request_bytes)
      : align(request_alignment(node)),
        offset(round_down(request_offset, align)),
        end(round_up(request_offset + request_bytes, align)),
        head_partial(request_offset != offset),
        tail_partial(request_offset + request_bytes != end) {}

  uint64_t bytes() const { return end - offset; }
  bool partial() const { return head_partial || tail_partial; }
  // The request starts and ends in the same, partially covered block.
  bool single_partial_block() const { return head_partial && tail_partial && bytes() == align; }
};

// Reads the aligned block at `block_offset` into a fresh bounce buffer, straight from the driver
// (the caller's serialising tracked request already covers it).
aio::Task<Result<BounceBuffer>> read_block(Node& node, uint64_t block_offset, uint64_t align) {
  Result<BounceBuffer> buffer = BounceBuffer::allocate(align, node.limits().memory_alignment);
  if (!buffer) {
    co_return std::move(buffer).error();
  }
  Result<void> read =
      co_await node.co_preadv(block_offset, align, IoVector(buffer->data(), align), 0);
  if (!read) {
    co_return std::move(read).error();
  }
  co_return std::move(buffer);
}

// Head and tail blocks of a read-modify-write. When the request lies within one block, both are
// the same buffer (`tail` points at `head`).
struct RmwBlocks {
  BounceBuffer head;
  BounceBuffer tail_storage;
  BounceBuffer* tail = nullptr;
};

aio::Task<Result<void>> read_rmw_blocks(Node& node, const AlignedRange& range, RmwBlocks& blocks) {
  if (range.head_partial) {
    Result<BounceBuffer> head = co_await read_block(node, range.offset, range.align);
    if (!head) {
      co_return std::move(head).error();
    }
    blocks.head = std::move(*head);
  }
  if (range.tail_partial) {
    const uint64_t tail_offset = range.end - range.align;
    if (range.head_partial && tail_offset == range.offset) {
      blocks.tail = &blocks.head;
    } else {
      Result<BounceBuffer> tail = co_await read_block(node, tail_offset, range.align);
      if (!tail) {
        co_return std::move(tail).error();
      }
      blocks.tail_storage = std::move(*tail);
      blocks.tail = &blocks.tail_storage;
    }
  }
  co_return ok();
}

// QEMU's bdrv_co_do_pwrite_zeroes: zeroes an aligned range through the driver's write-zeroes,
// split at pwrite_zeroes_alignment boundaries and by max_pwrite_zeroes; where the driver answers
// ENOTSUP (and kRequestNoFallback is not set), writes zero buffers of at most kMaxBounceBytes.
aio::Task<Result<void>> zero_aligned_range(Node& node, uint64_t offset, uint64_t bytes,
                                           uint32_t flags) {
  const NodeLimits& limits = node.limits();
  const uint64_t align = request_alignment(node);
  const uint64_t zero_align =
      std::max<uint64_t>(align, detail::round_up(limits.pwrite_zeroes_alignment, align));
  uint64_t max_zeroes = limits.max_pwrite_zeroes != 0
                            ? round_down(limits.max_pwrite_zeroes, zero_align)
                            : round_down(detail::kMaxRequestValue, zero_align);
  if (max_zeroes == 0) {
    max_zeroes = zero_align;
  }
  const uint64_t max_transfer = detail::max_transfer_bytes(node);
  uint64_t head = offset % zero_align;
  const uint64_t tail = (offset + bytes) % zero_align;
  BounceBuffer zeroes;

  while (bytes > 0) {
    uint64_t num = bytes;
    if (head != 0) {
      // A small request up to the first zero_align boundary (kept within max_transfer so that a
      // fallback needs no further split).
      num = std::min({bytes, max_transfer, zero_align - head});
      head = (head + num) % zero_align;
    } else if (tail != 0 && num > zero_align) {
      // Shorten the request to the last aligned boundary; the tail goes in the last iteration.
      num -= tail;
    }
    num = std::min(num, max_zeroes);

    Result<void> result = co_await node.co_pwrite_zeroes(offset, num, flags);
    if (!result && detail::is_not_supported(result.error()) && (flags & kRequestNoFallback) == 0) {
      // Fall back to writing zero buffers.
      const uint64_t chunk = detail::bounce_chunk_bytes(node);
      if (zeroes.data() == nullptr) {
        Result<BounceBuffer> allocated =
            BounceBuffer::allocate(std::min(chunk, num), limits.memory_alignment);
        if (!allocated) {
          co_return allocated.error();
        }
        zeroes = std::move(*allocated);
      }
      result = ok();
      for (uint64_t done = 0; done < num;) {
        const uint64_t len = std::min<uint64_t>({chunk, num - done, zeroes.size()});
        Result<void> written = co_await node.co_pwritev(
            offset + done, len, IoVector(zeroes.data(), len), flags & kRequestFua);
        if (!written) {
          result = std::move(written);
          break;
        }
        done += len;
      }
    }
    if (!result) {
      co_return result;
    }
    offset += num;
    bytes -= num;
  }
  co_return ok();
}

}  // namespace

aio::Task<Result<void>> preadv(Node& node, uint64_t offset, IoVector qiov, uint32_t flags) {
  const uint64_t bytes = qiov.size();
  Result<void> checked = detail::check_data_request(node, offset, bytes, "read");
  if (!checked) {
    co_return checked;
  }
  if (bytes == 0) {
    co_return ok();
  }
  if ((flags & kRequestCopyOnRead) != 0) {
    co_return co_await detail::copy_on_read(node, offset, std::move(qiov),
                                            (flags & kRequestPrefetch) != 0);
  }
  RequestTracker& tracker = node.requests();
  if (tracker.quiesced()) {
    co_await tracker.wait_until_unquiesced();
  }
  RequestTracker::InFlight in_flight(tracker);

  const AlignedRange range(node, offset, bytes);
  TrackedRequest request(tracker, offset, bytes, RequestType::kRead,
                         (flags & kRequestSerialising) != 0, range.offset, range.bytes());
  if ((flags & kRequestNoSerialising) == 0 && may_wait_serialising(request)) {
    bool waited = co_await wait_serialising(request);
    (void)waited;
  }

  if (!range.partial() && detail::is_memory_aligned(node, qiov)) {
    if (bytes <= detail::max_transfer_bytes(node)) {
      // The common case, without driver_preadv's frame.
      Result<void> result = co_await node.co_preadv(offset, bytes, std::move(qiov), 0);
      co_return result;
    }
    Result<void> result = co_await detail::driver_preadv(node, offset, std::move(qiov), 0);
    co_return result;
  }

  // Read the aligned superset through a bounce buffer, chunk by chunk, and copy out the caller's
  // part.
  const uint64_t chunk = detail::bounce_chunk_bytes(node);
  Result<BounceBuffer> buffer =
      BounceBuffer::allocate(std::min(chunk, range.bytes()), node.limits().memory_alignment);
  if (!buffer) {
    co_return buffer.error();
  }
  const uint64_t end = offset + bytes;
  for (uint64_t pos = range.offset; pos < range.end;) {
    const uint64_t len = std::min(chunk, range.end - pos);
    Result<void> read = co_await node.co_preadv(pos, len, IoVector(buffer->data(), len), 0);
    if (!read) {
      co_return read;
    }
    const uint64_t copy_start = std::max(pos, offset);
    const uint64_t copy_end = std::min(pos + len, end);
    qiov.copy_from(copy_start - offset, buffer->data() + (copy_start - pos), copy_end - copy_start);
    pos += len;
  }
  co_return ok();
}

aio::Task<Result<void>> pwritev(Node& node, uint64_t offset, IoVector qiov, uint32_t flags) {
  const uint64_t bytes = qiov.size();
  Result<void> checked = detail::check_data_request(node, offset, bytes, "write");
  if (checked) {
    checked = detail::check_writable(node);
  }
  if (!checked) {
    co_return checked;
  }
  if (bytes == 0) {
    co_return ok();
  }
  RequestTracker& tracker = node.requests();
  if (tracker.quiesced()) {
    co_await tracker.wait_until_unquiesced();
  }
  RequestTracker::InFlight in_flight(tracker);

  const AlignedRange range(node, offset, bytes);
  const bool serialising = range.partial() || (flags & kRequestSerialising) != 0;
  TrackedRequest request(tracker, offset, bytes, RequestType::kWrite, serialising, range.offset,
                         range.bytes());
  if (may_wait_serialising(request)) {
    bool waited = co_await wait_serialising(request);
    (void)waited;
  }
  const uint32_t driver_flags = flags & (kRequestFua | kRequestWriteCompressed);
  if ((flags & kRequestWriteCompressed) != 0 &&
      (!node.supports_compressed_writes() || range.partial())) {
    co_return Error(ErrorKind::kUnsupported, "Compression is not supported for this drive",
                    ENOTSUP);
  }

  if (!range.partial() && detail::is_memory_aligned(node, qiov)) {
    Result<void> notified =
        co_await tracker.notify_write(node, offset, bytes, flags & ~kRequestSerialising);
    if (!notified) {
      co_return notified;
    }
    Result<void> result =
        co_await detail::driver_pwritev(node, offset, std::move(qiov), driver_flags);
    detail::write_finished(node, offset, bytes);
    co_return result;
  }

  // Read-modify-write of the partial head and tail blocks (the request is serialising, so nothing
  // overlapping changes them meanwhile), then write the aligned superset from bounce buffers.
  RmwBlocks blocks;
  Result<void> read = co_await read_rmw_blocks(node, range, blocks);
  if (!read) {
    co_return read;
  }
  Result<void> notified =
      co_await tracker.notify_write(node, offset, bytes, flags & ~kRequestSerialising);
  if (!notified) {
    co_return notified;
  }
  const uint64_t chunk = detail::bounce_chunk_bytes(node);
  Result<BounceBuffer> buffer =
      BounceBuffer::allocate(std::min(chunk, range.bytes()), node.limits().memory_alignment);
  if (!buffer) {
    co_return buffer.error();
  }
  const uint64_t end = offset + bytes;
  const uint64_t tail_block = range.end - range.align;
  Result<void> result = ok();
  for (uint64_t pos = range.offset; pos < range.end;) {
    const uint64_t len = std::min(chunk, range.end - pos);
    char* data = buffer->data();
    if (range.head_partial && pos == range.offset) {
      std::memcpy(data, blocks.head.data(), range.align);
    }
    if (range.tail_partial && tail_block >= pos && tail_block < pos + len) {
      std::memcpy(data + (tail_block - pos), blocks.tail->data(), range.align);
    }
    const uint64_t copy_start = std::max(pos, offset);
    const uint64_t copy_end = std::min(pos + len, end);
    qiov.copy_to(copy_start - offset, data + (copy_start - pos), copy_end - copy_start);
    result = co_await node.co_pwritev(pos, len, IoVector(data, len), driver_flags);
    if (!result) {
      break;
    }
    pos += len;
  }
  detail::write_finished(node, offset, bytes);
  co_return result;
}

aio::Task<Result<void>> pread(Node& node, uint64_t offset, void* buffer, size_t bytes) {
  Result<void> result = co_await preadv(node, offset, IoVector(buffer, bytes), 0);
  co_return result;
}

aio::Task<Result<void>> pwrite(Node& node, uint64_t offset, const void* buffer, size_t bytes,
                               uint32_t flags) {
  // IoVector is not const-correct; the write path only reads from it.
  Result<void> result =
      co_await pwritev(node, offset, IoVector(const_cast<void*>(buffer), bytes), flags);
  co_return result;
}

aio::Task<Result<void>> pwrite_zeroes(Node& node, uint64_t offset, uint64_t bytes, uint32_t flags) {
  Result<void> checked = detail::check_data_request(node, offset, bytes, "write zeroes");
  if (checked) {
    checked = detail::check_writable(node);
  }
  if (!checked) {
    co_return checked;
  }
  if (bytes == 0) {
    co_return ok();
  }
  if (node.common_options().discard != "unmap") {
    flags &= ~kRequestMayUnmap;
  }
  const AlignedRange range(node, offset, bytes);
  if (range.partial() && (flags & kRequestNoFallback) != 0) {
    co_return Error(
        ErrorKind::kUnsupported,
        "Fast write-zeroes needs requests aligned to " + std::to_string(range.align) + " bytes",
        ENOTSUP);
  }
  RequestTracker& tracker = node.requests();
  if (tracker.quiesced()) {
    co_await tracker.wait_until_unquiesced();
  }
  RequestTracker::InFlight in_flight(tracker);

  const bool serialising = range.partial() || (flags & kRequestSerialising) != 0;
  TrackedRequest request(tracker, offset, bytes, RequestType::kWrite, serialising, range.offset,
                         range.bytes());
  if (may_wait_serialising(request)) {
    bool waited = co_await wait_serialising(request);
    (void)waited;
  }

  RmwBlocks blocks;
  Result<void> result = co_await read_rmw_blocks(node, range, blocks);
  if (!result) {
    co_return result;
  }
  result = co_await tracker.notify_write(node, offset, bytes,
                                         (flags & ~kRequestSerialising) | kNotifyWriteZeroes);
  if (!result) {
    co_return result;
  }

  const uint32_t write_flags = flags & kRequestFua;
  const uint64_t end = offset + bytes;
  if (range.head_partial) {
    const uint64_t zero_start = offset - range.offset;
    const uint64_t zero_end = std::min(range.align, end - range.offset);
    std::memset(blocks.head.data() + zero_start, 0, zero_end - zero_start);
    result = co_await node.co_pwritev(range.offset, range.align,
                                      IoVector(blocks.head.data(), range.align), write_flags);
  }
  const uint64_t middle_start = round_up(offset, range.align);
  const uint64_t middle_end = round_down(end, range.align);
  if (result && middle_start < middle_end) {
    result =
        co_await zero_aligned_range(node, middle_start, middle_end - middle_start,
                                    flags & (kRequestFua | kRequestMayUnmap | kRequestNoFallback));
  }
  if (result && range.tail_partial && !range.single_partial_block()) {
    const uint64_t tail_block = range.end - range.align;
    std::memset(blocks.tail->data(), 0, end - tail_block);
    result = co_await node.co_pwritev(tail_block, range.align,
                                      IoVector(blocks.tail->data(), range.align), write_flags);
  }
  detail::write_finished(node, offset, bytes);
  co_return result;
}

}  // namespace strata::block::io
