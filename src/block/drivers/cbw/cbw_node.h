#pragma once
// The copy-before-write filter (QEMU's block/copy-before-write.c): reads pass to `file`; before a
// write, write-zeroes or discard reaches `file`, block-copy saves the old contents of the
// clusters it touches to `target`. A reader of `target` (with `file` as its backing) therefore
// sees `file` as it was when the filter was inserted (image fleecing).
//
// Options: file, target (BlockdevRefs), bitmap {node, name} (only the clusters set in it are
// frozen; the others are never copied), on-cbw-error (break-guest-write: the guest write fails
// when the copy fails; break-snapshot: the write goes on and the snapshot is marked broken, no
// more copies are made), min-cluster-size. cbw-timeout is not supported.

#include <optional>
#include <string>

#include "block/copy/block_copy.h"
#include "block/drivers/driver.h"

namespace strata::block {

struct CbwOptions : DriverOptions {
  BlockdevRef file;
  BlockdevRef target;
  std::optional<std::string> bitmap_node;
  std::optional<std::string> bitmap_name;
  bool break_snapshot = false;  // on-cbw-error
  uint64_t min_cluster_size = 0;
};

class CbwNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  CbwNode(CommonOptions common, bool break_snapshot);

  const char* driver_name() const override { return "copy-before-write"; }
  bool is_filter() const override { return true; }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  uint64_t length() const override { return file().length(); }
  // QEMU's cbw_child_perm: the target is written (and may be written by others), never resized.
  void child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                  uint64_t& child_shared) const override;

  // The engine, for tests and fleecing readers; nullptr after a break-snapshot failure.
  copy::BlockCopy* block_copy() const { return snapshot_broken_ ? nullptr : block_copy_.get(); }
  bool snapshot_broken() const { return snapshot_broken_; }

 private:
  Node& file() const { return *children().front()->node(); }
  // QEMU's cbw_do_copy_before_write.
  aio::Task<Result<void>> copy_before_write(uint64_t offset, uint64_t bytes);

  bool break_snapshot_;
  bool snapshot_broken_ = false;
  std::unique_ptr<copy::BlockCopy> block_copy_;
};

}  // namespace strata::block
