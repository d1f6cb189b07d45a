#pragma once
// The request layer (QEMU's block/io.c): the entry points every user of a node calls. Drivers call
// them on their children, exports and jobs on their roots; nobody calls a node's co_* methods
// directly.
//
// What the layer guarantees to drivers (Node::co_* contract):
// - ranges were checked: no offset or length above INT64_MAX, data requests end within length()
//   rounded up to request_alignment (a node whose length is not a multiple of its alignment sees
//   reads of the last partial block and must zero-fill past its end);
// - offsets and lengths of co_preadv/co_pwritev/co_pwrite_zeroes/co_pdiscard are multiples of
//   limits().request_alignment, data requests are at most limits().max_transfer bytes,
//   write-zeroes at most max_pwrite_zeroes, discard at most max_pdiscard;
// - every iovec handed to co_preadv/co_pwritev starts at an address and has a length that are
//   multiples of limits().memory_alignment (unaligned caller buffers are bounced);
// - no write, write-zeroes, discard or truncate reaches a node that is read-only or inactive;
// - the request is in the node's gate and tracked; the only flags passed through are kRequestFua
//   (writes; drivers implement FUA themselves), kRequestWriteCompressed (writes, only to nodes
//   whose supports_compressed_writes() is true), kRequestFua | kRequestMayUnmap |
//   kRequestNoFallback (write-zeroes).
//
// Errors: a range beyond INT64_MAX is kInvalidArgument/EINVAL; a data request beyond length() is
// kIo/EIO; a write to a read-only or inactive node is kPermission/EPERM. Zero-length requests
// succeed without reaching the driver (flush always runs).
//
// All functions must run on the node's home loop.

#include <cstddef>
#include <cstdint>

#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"
#include "block/io/io_vector.h"
#include "block/io/request_tracker.h"

namespace strata::block {

namespace io {

// Largest bounce buffer the layer allocates per chunk (unaligned or misaligned requests and the
// write-zeroes fallback are processed in chunks of at most this size).
inline constexpr uint64_t kMaxBounceBytes = 1u << 20;

// Reads qiov.size() bytes at `offset`. flags: kRequestSerialising (copy-on-read style: wait for
// and block overlapping requests), kRequestNoSerialising, kRequestCopyOnRead (QEMU's
// bdrv_co_do_copy_on_readv: the range, widened to the node's clusters, is held as a serialising
// request; parts not allocated in the node itself are read into a bounce buffer - never the
// caller's - and written into the node (zeroes as write-zeroes), then copied out; the node
// must be writable, and the writes mark dirty bitmaps but run no write notifiers, since they
// do not change what the node reads as).
aio::Task<Result<void>> preadv(Node& node, uint64_t offset, IoVector qiov, uint32_t flags = 0);
// Writes qiov.size() bytes at `offset`. An unaligned write is a read-modify-write of its head and
// tail blocks, serialised against every overlapping request. flags: kRequestFua,
// kRequestSerialising, kRequestWriteCompressed (ENOTSUP "Compression is not supported for this
// drive" unless the node supports it and the request is aligned).
aio::Task<Result<void>> pwritev(Node& node, uint64_t offset, IoVector qiov, uint32_t flags = 0);
aio::Task<Result<void>> pread(Node& node, uint64_t offset, void* buffer, size_t bytes);
aio::Task<Result<void>> pwrite(Node& node, uint64_t offset, const void* buffer, size_t bytes,
                               uint32_t flags = 0);
// Flushes the node's driver (skipped when nothing was written since the last flush, when the node
// is not writable, or with cache.no-flush), then every child this node may write to.
aio::Task<Result<void>> flush(Node& node);
// Advisory: only the part aligned to request_alignment is discarded, a driver's ENOTSUP is
// success, and a node opened with discard=ignore (the default) discards nothing (QEMU's
// BDRV_O_UNMAP).
aio::Task<Result<void>> pdiscard(Node& node, uint64_t offset, uint64_t bytes);
// Zeroes the range. flags: kRequestFua, kRequestMayUnmap (dropped unless discard=unmap),
// kRequestNoFallback (fail with ENOTSUP instead of writing zero buffers; unaligned requests fail
// with ENOTSUP too), kRequestSerialising.
aio::Task<Result<void>> pwrite_zeroes(Node& node, uint64_t offset, uint64_t bytes,
                                      uint32_t flags = 0);
// Status of the run starting at `offset`: bytes is clamped to the node's end and the result covers
// at least 1 byte. kRecurse answers are resolved in their file; kAllocated is set whenever kData or
// kZero is. Fails with EINVAL when offset is at or past the end, or bytes is 0.
aio::Task<Result<BlockStatus>> block_status(Node& node, uint64_t offset, uint64_t bytes);
// QEMU's bdrv_is_allocated_above (include_base false): whether some node from `top` down its
// backing chain (through filters), stopping above `base` (nullptr: the whole chain), holds the
// data at `offset` itself, and for how many bytes (<= `bytes`, > 0) that answer holds. A layer
// that ends before `offset` counts as allocated there (it reads as zeroes, not as what is
// below it).
struct Allocation {
  bool allocated = false;
  uint64_t bytes = 0;
};
aio::Task<Result<Allocation>> is_allocated_above(Node& top, const Node* base, uint64_t offset,
                                                 uint64_t bytes);

// Resizes the node; serialised against every request in the range between old and new size.
aio::Task<Result<void>> truncate(Node& node, uint64_t new_size, bool exact);

// Waits until the node and, recursively, its children have no request in flight. New requests to
// `node` wait meanwhile (children are not quiesced: the node's own in-flight requests must be able
// to reach them). Must not be called from inside a request of `node`.
aio::Task<void> drain(Node& node);
// Quiesce (QEMU's bdrv_drained_begin/end, nestable): while any drain_begin is unmatched, new
// requests to `node` wait before entering its gate. Requests already in flight continue;
// `co_await drain(node)` after drain_begin waits for them.
void drain_begin(Node& node);
void drain_end(Node& node);

// Drops `node` once no request is in flight in it. For a filter taken out of the graph while guest
// requests may still be inside it (they go on to the node below through its child edge): the
// node stays alive, checked again on each turn of the current loop, until they have finished.
void release_when_idle(std::shared_ptr<Node> node);

// Write notifiers of `node` (see request_tracker.h).
RequestTracker::NotifierId add_write_notifier(Node& node, WriteNotifier notifier);
void remove_write_notifier(Node& node, RequestTracker::NotifierId id);

}  // namespace io
}  // namespace strata::block
