#include "block/graph/node.h"

#include <cerrno>
#include <vector>

#include "base/qemu_json.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/graph/graph.h"
#include "block/io/request.h"
#include "block/io/request_tracker.h"

namespace strata::block {

Node::Node(CommonOptions options)
    : options_(std::move(options)),
      read_only_(options_.read_only),
      active_(options_.active),
      created_inactive_(!options_.active),
      requests_(std::make_unique<RequestTracker>()),
      dirty_bitmaps_(std::make_unique<bitmap::BitmapSet>()) {}

Node::~Node() {
  if (graph_ != nullptr) {
    graph_->node_destroyed(*this);
  }
}

std::string Node::filename() const {
  if (auto exact = exact_filename()) {
    return *exact;
  }
  return "json:" + qemu_json(full_options(), /*pretty=*/false);
}

nlohmann::json Node::full_options() const {
  nlohmann::json options = strong_options();
  options["driver"] = driver_name();
  for (const auto& c : children_) {
    options[c->name()] = c->node()->full_options();
  }
  return options;
}

aio::Task<Result<void>> Node::co_pwritev(uint64_t, uint64_t, IoVector, uint32_t) {
  co_return Error::from_errno(ENOTSUP, "Driver does not support writes");
}

aio::Task<Result<void>> Node::co_flush() {
  // Nothing of the node's own to flush; io::flush then flushes the children it writes to.
  co_return ok();
}

aio::Task<Result<void>> Node::co_pdiscard(uint64_t, uint64_t) {
  // Discard is advisory: a driver that cannot discard simply keeps the data.
  co_return ok();
}

aio::Task<Result<void>> Node::co_pwrite_zeroes(uint64_t, uint64_t, uint32_t) {
  // The request layer falls back to writing zeroed buffers (bounded, aligned, split).
  co_return Error::from_errno(ENOTSUP, "Driver has no efficient write-zeroes");
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

Result<void> Node::check_perm(uint64_t, uint64_t) {
  return ok();
}
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

void debug_event(Child* child, BlkdebugEvent event) {
  if (child != nullptr && child->node() != nullptr) {
    child->node()->debug_event(event);
  }
}

Child* Node::primary_child() const {
  for (const auto& c : children_) {
    if ((c->role() & kRolePrimary) != 0) {
      return c.get();
    }
  }
  return nullptr;
}

aio::Task<Result<void>> Node::co_change_backing_file(std::string file, std::string format) {
  (void)file;
  (void)format;
  co_return Error(ErrorKind::kUnsupported,
                  std::string("Driver '") + driver_name() + "' does not support backing files",
                  ENOTSUP);
}

Node* filter_or_cow(const Node& node) {
  if (Child* backing = node.backing_child(); backing != nullptr) {
    return backing->node();
  }
  if (Child* primary = node.primary_child(); primary != nullptr && node.is_filter()) {
    return primary->node();
  }
  return nullptr;
}

Node* find_backing_image(const Node& top, const std::string& filename) {
  for (Node* node = filter_or_cow(top); node != nullptr; node = filter_or_cow(*node)) {
    if (node->filename() == filename) {
      return node;
    }
  }
  return nullptr;
}

bool chain_contains(const Node& top, const Node& wanted) {
  for (const Node* node = &top; node != nullptr; node = filter_or_cow(*node)) {
    if (node == &wanted) {
      return true;
    }
  }
  return false;
}

}  // namespace strata::block
