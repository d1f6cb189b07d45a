#include "block/drivers/snapshot_access/snapshot_access_node.h"

#include "block/drivers/cbw/cbw_node.h"

namespace strata::block {

namespace {

Error not_supported() {
  return Error(ErrorKind::kUnsupported, "Operation not supported", ENOTSUP);
}

}  // namespace

std::unique_ptr<DriverOptions> SnapshotAccessNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<SnapshotAccessOptions>();
  if (auto file = parse_blockdev_ref(d, "file", true)) {
    options->file = std::move(*file);
  }
  return options;
}

Result<std::shared_ptr<Node>> SnapshotAccessNode::open(OpenContext& context,
                                                       const BlockdevOptions& options) {
  const auto& o = static_cast<const SnapshotAccessOptions&>(*options.driver_options);
  auto node = std::make_shared<SnapshotAccessNode>(context.options());
  auto file = context.attach(*node, o.file, "file", kRoleData | kRolePrimary);
  if (!file) {
    return std::move(file).error();
  }
  node->limits_ = (*file)->node()->limits();
  return std::shared_ptr<Node>(std::move(node));
}

CbwNode* SnapshotAccessNode::filter() const {
  return dynamic_cast<CbwNode*>(&file());
}

void SnapshotAccessNode::child_perm(const Child& child, uint64_t perm, uint64_t shared,
                                    uint64_t& child_perm, uint64_t& child_shared) const {
  (void)child;
  (void)perm;
  (void)shared;
  child_perm = 0;
  child_shared = kPermAll;
}

aio::Task<Result<void>> SnapshotAccessNode::co_preadv(uint64_t offset, uint64_t bytes,
                                                      IoVector qiov, uint32_t flags) {
  (void)flags;
  CbwNode* cbw = filter();
  if (cbw == nullptr) {
    co_return not_supported();
  }
  co_return co_await cbw->snapshot_preadv(offset, bytes, std::move(qiov));
}

aio::Task<Result<void>> SnapshotAccessNode::co_pwritev(uint64_t offset, uint64_t bytes,
                                                       IoVector qiov, uint32_t flags) {
  (void)offset;
  (void)bytes;
  (void)qiov;
  (void)flags;
  co_return not_supported();
}

aio::Task<Result<void>> SnapshotAccessNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                                             uint32_t flags) {
  (void)offset;
  (void)bytes;
  (void)flags;
  co_return not_supported();
}

aio::Task<Result<void>> SnapshotAccessNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  CbwNode* cbw = filter();
  if (cbw == nullptr) {
    co_return not_supported();
  }
  co_return co_await cbw->snapshot_discard(offset, bytes);
}

aio::Task<Result<BlockStatus>> SnapshotAccessNode::co_block_status(uint64_t offset,
                                                                   uint64_t bytes) {
  CbwNode* cbw = filter();
  if (cbw == nullptr) {
    co_return not_supported();
  }
  Result<BlockStatus> status = co_await cbw->snapshot_block_status(offset, bytes);
  if (status && (status->flags & (BlockStatus::kData | BlockStatus::kZero)) == 0) {
    // Unallocated in the active disk's own layer: the view reads what its backing file holds.
    status->flags = BlockStatus::kData | BlockStatus::kAllocated;
    status->file = nullptr;
  }
  co_return status;
}

aio::Task<Result<void>> SnapshotAccessNode::co_flush() {
  co_return ok();  // nothing is written through this node
}

}  // namespace strata::block
