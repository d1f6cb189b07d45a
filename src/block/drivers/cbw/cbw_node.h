#pragma once
// The copy-before-write filter (QEMU's block/copy-before-write.c): reads pass to `file`; before a
// write, write-zeroes or discard reaches `file`, block-copy saves the old contents of the
// clusters it touches to `target`. A reader of `target` (with `file` as its backing) therefore
// sees `file` as it was when the filter was inserted (image fleecing).
//
// Options: file, target (BlockdevRefs), bitmap {node, name} (only the clusters set in it are
// frozen; the others are never copied), on-cbw-error (break-guest-write: the guest write fails
// when the copy fails; break-snapshot: the write goes on and the snapshot is marked broken, no
// more copies are made), min-cluster-size, cbw-timeout (seconds, 0 = none: a copy that takes
// longer fails the guest write with ETIMEDOUT, or breaks the snapshot, per on-cbw-error; the
// copy itself goes on in the background, as QEMU's block_copy with a timeout does).
//
// Snapshot access (QEMU's cbw_snapshot_* API, used by the snapshot-access driver): the frozen
// view is read through the filter itself. A cluster already copied reads from `target`; any other
// cluster reads from `file` while a guest write to it waits until that read is done (so the
// target needs no backing link and may be any format). Clusters outside the bitmap, discarded
// from the snapshot, or every cluster after a break-snapshot failure fail with EACCES.

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/bitmap/dirty_bitmap.h"

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
  uint32_t cbw_timeout = 0;  // seconds
};

class CbwNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  CbwNode(CommonOptions common, bool break_snapshot, uint32_t timeout_seconds);

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

  // ---- the frozen view (cbw_snapshot.cc) -------------------------------------------------
  // Reads [offset, offset + bytes) as it was when the filter was inserted.
  aio::Task<Result<void>> snapshot_preadv(uint64_t offset, uint64_t bytes, IoVector qiov);
  // Status of the frozen view at `offset` (from `target` where copied, else from `file`).
  aio::Task<Result<BlockStatus>> snapshot_block_status(uint64_t offset, uint64_t bytes);
  // Drops the whole clusters inside the range from the snapshot: they become unreadable, are
  // never copied again, and their copies in `target` are discarded.
  aio::Task<Result<void>> snapshot_discard(uint64_t offset, uint64_t bytes);

  // The engine, for tests and fleecing readers; nullptr after a break-snapshot failure.
  copy::BlockCopy* block_copy() const { return snapshot_broken_ ? nullptr : block_copy_.get(); }
  bool snapshot_broken() const { return snapshot_broken_; }

 private:
  Node& file() const { return *children().front()->node(); }
  // QEMU's cbw_do_copy_before_write.
  aio::Task<Result<void>> copy_before_write(uint64_t offset, uint64_t bytes);

  // A snapshot read of `file` in flight; guest writes to its clusters wait for it.
  struct FrozenRead {
    uint64_t offset;
    uint64_t bytes;
  };
  // Where the frozen view of the run at `offset` lives: the child to read and the run length
  // (<= bytes), or EACCES.
  struct SnapshotRun {
    Node* child;
    uint64_t bytes;
    bool from_file;
  };
  Result<SnapshotRun> snapshot_run(uint64_t offset, uint64_t bytes) const;
  // Waits until no snapshot read of `file` overlaps [offset, offset + bytes).
  aio::Task<void> wait_frozen_reads(uint64_t offset, uint64_t bytes);
  Node& target() const { return *children()[1]->node(); }
  // One copy under cbw-timeout, shared by the waiting guest write and the background tasks.
  struct TimedCopy;
  // The block-copy call over [start, end) waited for at most the timeout.
  aio::Task<Result<void>> copy_with_timeout(uint64_t start, uint64_t end);
  aio::Task<void> run_timed_copy(std::shared_ptr<TimedCopy> copy);
  aio::Task<void> run_timer(std::shared_ptr<TimedCopy> copy);

  bool break_snapshot_;
  bool snapshot_broken_ = false;
  std::unique_ptr<copy::BlockCopy> block_copy_;
  // Set: the cluster belongs to the frozen view (the bitmap option, less discarded clusters).
  std::unique_ptr<bitmap::DirtyBitmap> access_bitmap_;
  // Set: the cluster's old contents are in `target`.
  std::unique_ptr<bitmap::DirtyBitmap> done_bitmap_;
  std::vector<FrozenRead*> frozen_reads_;
  aio::CoQueue frozen_read_ended_;
  uint64_t timeout_ns_ = 0;
  // Copies that outlived their timeout, and the timers of timed copies. Declared last: destroyed
  // (their I/O cancelled) before the engine and the children they use.
  aio::TaskGroup background_;
};

}  // namespace strata::block
