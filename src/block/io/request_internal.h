#pragma once
// Helpers shared by the request layer's .cc files. Internal to block/io.

#include <cstdint>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"
#include "block/io/io_vector.h"

namespace strata::block::io::detail {

inline constexpr uint64_t kMaxRequestValue = static_cast<uint64_t>(INT64_MAX);

inline uint64_t round_down(uint64_t value, uint64_t alignment) {
  return value / alignment * alignment;
}
inline uint64_t round_up(uint64_t value, uint64_t alignment) {
  return round_down(value + alignment - 1, alignment);
}

// The node's request alignment (at least 1).
inline uint64_t request_alignment(const Node& node) {
  return node.limits().request_alignment > 1 ? node.limits().request_alignment : 1;
}

// QEMU's bdrv_check_request: offset, bytes and their sum must not exceed INT64_MAX.
Result<void> check_range(uint64_t offset, uint64_t bytes);
// check_range plus "ends within length()" (EIO), for data requests.
Result<void> check_data_request(const Node& node, uint64_t offset, uint64_t bytes,
                                const char* operation);
// Refuses changes to read-only or inactive nodes (EPERM).
Result<void> check_writable(const Node& node);

// True when every iovec of `qiov` starts at and spans a multiple of the node's memory alignment.
bool is_memory_aligned(const Node& node, const IoVector& qiov);

// The size of one bounce chunk: kMaxBounceBytes, limited by max_transfer, a multiple of the
// request alignment and at least one alignment unit.
uint64_t bounce_chunk_bytes(const Node& node);
// The largest single data request for the driver (max_transfer rounded down to the alignment, or
// unlimited).
uint64_t max_transfer_bytes(const Node& node);

// Driver calls for an aligned range into an aligned vector, split by max_transfer.
aio::Task<Result<void>> driver_preadv(Node& node, uint64_t offset, IoVector qiov, uint32_t flags);
aio::Task<Result<void>> driver_pwritev(Node& node, uint64_t offset, IoVector qiov, uint32_t flags);

// The end of a write, write-zeroes or discard of [offset, offset + bytes), successful or not
// (QEMU's bdrv_co_write_req_finish): bumps the node's write generation (flush skips nodes not
// written since their last flush) and marks the range in the node's enabled dirty bitmaps.
void write_finished(Node& node, uint64_t offset, uint64_t bytes);

// io::preadv with kRequestCopyOnRead (request_cor.cc).
// With `prefetch` the caller's buffer is left alone and parts the node holds are not read.
aio::Task<Result<void>> copy_on_read(Node& node, uint64_t offset, IoVector qiov, bool prefetch);

// True for an error that means "this driver cannot do that" (ENOTSUP / kUnsupported).
bool is_not_supported(const Error& error);

}  // namespace strata::block::io::detail
