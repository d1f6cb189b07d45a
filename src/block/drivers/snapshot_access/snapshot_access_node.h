#pragma once
// The snapshot-access driver (QEMU's block/snapshot-access.c): the point-in-time view that a
// copy-before-write node below it (`file`) keeps, as a node of its own, typically exported
// read-only over NBD for a backup tool (image fleecing).
//
// Reads and block status go to the copy-before-write node's frozen view (see cbw_node.h):
// never blocked by guest writes, EACCES for clusters outside the filter's bitmap, discarded, or
// lost to a break-snapshot failure. A discard drops whole clusters from the view and frees their
// copies. Writes and write-zeroes fail with ENOTSUP. The node takes no permissions on `file`
// and shares them all (the guest keeps writing through the filter). A `file` that is not a
// copy-before-write node opens, but every read fails with ENOTSUP, as in QEMU.

#include "block/drivers/driver.h"

namespace strata::block {

class CbwNode;

struct SnapshotAccessOptions : DriverOptions {
  BlockdevRef file;
};

class SnapshotAccessNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  explicit SnapshotAccessNode(CommonOptions common) : Node(std::move(common)) {}

  const char* driver_name() const override { return "snapshot-access"; }
  uint64_t length() const override { return file().length(); }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_flush() override;
  // QEMU's snapshot_access_child_perm: nothing taken, everything shared.
  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override;

 private:
  Node& file() const { return *children().front()->node(); }
  // The copy-before-write node below, or nullptr.
  CbwNode* filter() const;
};

}  // namespace strata::block
