#include "block/mirror/mirror_top_node.h"

#include <optional>

#include "block/io/request.h"

namespace strata::block::mirror {

void MirrorTopNode::child_perm(const Child& child, uint64_t perm, uint64_t shared,
                               uint64_t& child_perm, uint64_t& child_shared) const {
  if (core_->stopped()) {
    child_perm = 0;
    child_shared = kPermAll;
    return;
  }
  Node::child_perm(child, perm, shared, child_perm, child_shared);
  if (is_commit_) {
    child_perm &= ~kPermConsistentRead;
    child_shared |= kPermWrite;
  }
}

aio::Task<Result<void>> MirrorTopNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                 uint32_t flags) {
  (void)bytes;
  co_return co_await io::preadv(source(), offset, std::move(qiov), flags & kRequestNoSerialising);
}

aio::Task<Result<void>> MirrorTopNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                                  uint32_t flags) {
  co_return co_await write(WriteMethod::kCopy, offset, bytes, &qiov, flags);
}

aio::Task<Result<void>> MirrorTopNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                                        uint32_t flags) {
  co_return co_await write(WriteMethod::kZero, offset, bytes, nullptr, flags);
}

aio::Task<Result<void>> MirrorTopNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  co_return co_await write(WriteMethod::kDiscard, offset, bytes, nullptr, 0);
}

aio::Task<Result<void>> MirrorTopNode::write(WriteMethod method, uint64_t offset, uint64_t bytes,
                                             const IoVector* qiov, uint32_t flags) {
  // Keeps the core (and through it the target) alive across the suspensions below.
  std::shared_ptr<MirrorCore> core = core_;
  const bool copy_to_target = core->copies_to_target();
  std::optional<MirrorCore::RangeLock> lock;
  if (copy_to_target) {
    co_await core->wait_for_overlaps(core->align_down(offset), core->align_up(offset + bytes));
    lock.emplace(*core, core->align_down(offset), core->align_up(offset + bytes));
  }
  Result<void> written = ok();
  switch (method) {
    case WriteMethod::kCopy:
      written = co_await io::pwritev(source(), offset, *qiov, flags & kRequestFua);
      break;
    case WriteMethod::kZero:
      written = co_await io::pwrite_zeroes(source(), offset, bytes, flags);
      break;
    case WriteMethod::kDiscard:
      written = co_await io::pdiscard(source(), offset, bytes);
      break;
  }
  if (core->stopped()) {
    co_return written;
  }
  if (!copy_to_target) {
    // Marked after the write reached the source: a copy that read the old data before has
    // cleared its bits already, so the region is copied again.
    core->mark_dirty(offset, bytes);
  } else if (written) {
    co_await core->write_to_target(method, offset, bytes, qiov, flags);
  }
  co_return written;
}

}  // namespace strata::block::mirror
