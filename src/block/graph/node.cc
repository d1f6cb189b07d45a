#include "block/graph/node.h"

#include <cerrno>
#include <cstdlib>
#include <vector>

#include "block/graph/graph.h"
#include "block/io/request.h"
#include "block/io/request_tracker.h"

namespace strata::block {

Node::Node(CommonOptions options)
    : options_(std::move(options)),
      read_only_(options_.read_only),
      active_(options_.active),
      created_inactive_(!options_.active),
      requests_(std::make_unique<RequestTracker>()) {}

Node::~Node() {
  if (graph_ != nullptr) {
    graph_->node_destroyed(*this);
  }
}

std::string Node::filename() const {
  if (Child* primary = primary_child(); primary != nullptr && is_filter()) {
    return primary->node()->filename();
  }
  return "json:" + open_options_.dump();
}

aio::Task<Result<void>> Node::co_pwritev(uint64_t, uint64_t, IoVector, uint32_t) {
  co_return Error::from_errno(ENOTSUP, "Driver does not support writes");
}

aio::Task<Result<void>> Node::co_flush() {
  if (Child* primary = primary_child(); primary != nullptr) {
    auto result = co_await io::flush(*primary->node());
    co_return result;
  }
  co_return ok();
}

aio::Task<Result<void>> Node::co_pdiscard(uint64_t, uint64_t) {
  // Discard is advisory: a driver that cannot discard simply keeps the data.
  co_return ok();
}

aio::Task<Result<void>> Node::co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t flags) {
  if ((flags & kRequestNoFallback) != 0) {
    co_return Error::from_errno(ENOTSUP, "Fast write-zeroes not supported");
  }
  constexpr uint64_t kChunk = 1 << 20;
  size_t alignment = limits_.memory_alignment > 64 ? limits_.memory_alignment : 64;
  size_t buffer_size = static_cast<size_t>(bytes < kChunk ? bytes : kChunk);
  size_t rounded = (buffer_size + alignment - 1) / alignment * alignment;
  void* raw = std::aligned_alloc(alignment, rounded);
  if (raw == nullptr) {
    co_return Error::from_errno(ENOMEM, "Could not allocate zero buffer");
  }
  std::unique_ptr<void, decltype(&std::free)> zeroes(raw, &std::free);
  std::memset(raw, 0, rounded);
  while (bytes > 0) {
    uint64_t chunk = bytes < buffer_size ? bytes : buffer_size;
    auto written = co_await co_pwritev(offset, chunk, IoVector(raw, chunk), flags & kRequestFua);
    if (!written) {
      co_return written;
    }
    offset += chunk;
    bytes -= chunk;
  }
  co_return ok();
}

aio::Task<Result<BlockStatus>> Node::co_block_status(uint64_t offset, uint64_t bytes) {
  BlockStatus status;
  status.bytes = bytes;
  status.flags = BlockStatus::kData | BlockStatus::kAllocated;
  if (Child* primary = primary_child(); primary != nullptr && is_filter()) {
    status.flags = BlockStatus::kRecurse | BlockStatus::kOffsetValid;
    status.map_offset = offset;
    status.file = primary->node();
  }
  co_return status;
}

aio::Task<Result<void>> Node::co_truncate(uint64_t, bool) {
  co_return Error::from_errno(ENOTSUP, "Driver does not support resizing");
}

std::optional<uint64_t> Node::allocated_size() const {
  if (Child* primary = primary_child(); primary != nullptr) {
    return primary->node()->allocated_size();
  }
  return std::nullopt;
}

void Node::child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                      uint64_t& child_shared) const {
  // QEMU's bdrv_default_perms (block.c): filters pass everything through; backing files are
  // read consistently; storage children carry metadata and data.
  uint32_t role = child.role();
  if ((role & kRoleFiltered) != 0) {
    child_perm = perm & kPermAll;
    child_shared = shared & kPermAll;
    return;
  }
  if ((role & kRoleCow) != 0) {
    child_perm = perm & kPermConsistentRead;
    child_shared = (shared & kPermWrite) != 0 ? (kPermWrite | kPermResize) : 0;
    child_shared |= kPermConsistentRead | kPermWriteUnchanged;
    if (!active_) {
      child_shared |= kPermWrite | kPermResize;
    }
    return;
  }
  perm &= kPermAll;
  shared &= kPermAll;
  if ((role & kRoleMetadata) != 0) {
    if (is_writable()) {
      perm |= kPermWrite | kPermResize;
    }
    perm |= kPermConsistentRead;
    shared &= ~(kPermWrite | kPermResize);
  }
  if ((role & kRoleData) != 0) {
    shared &= ~kPermResize;
    if ((perm & kPermWriteUnchanged) != 0) {
      perm |= kPermWrite;
    }
    if ((perm & kPermWrite) != 0) {
      perm |= kPermResize;
    }
  }
  if (!active_) {
    shared |= kPermWrite | kPermResize;
  }
  child_perm = perm;
  child_shared = shared;
}

Result<std::function<void()>> Node::prepare_reopen(const DriverOptions&) {
  return std::function<void()>([] {});
}

Result<void> Node::check_perm(uint64_t, uint64_t) { return ok(); }
void Node::set_perm(uint64_t, uint64_t) {}
void Node::abort_perm() {}

uint64_t Node::cumulative_perm() const {
  uint64_t perm = 0;
  for (const Child* parent : parents_) {
    perm |= parent->perm();
  }
  return perm;
}

uint64_t Node::cumulative_shared() const {
  uint64_t shared = kPermAll;
  for (const Child* parent : parents_) {
    shared &= parent->shared();
  }
  return shared;
}

Child* Node::child(std::string_view name) const {
  for (const auto& c : children_) {
    if (c->name() == name) {
      return c.get();
    }
  }
  return nullptr;
}

Child* Node::primary_child() const {
  for (const auto& c : children_) {
    if ((c->role() & kRolePrimary) != 0) {
      return c.get();
    }
  }
  return nullptr;
}

}  // namespace strata::block
