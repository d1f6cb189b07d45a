#pragma once
// MirrorCore: what a mirror job and its mirror_top filter share (QEMU's MirrorBlockJob fields that
// the bdrv_mirror_top_* functions reach). The filter sits above the job's source; every guest
// write passes it and, once it has reached the source, is either marked in the dirty bitmap
// (copy-mode background) or written to the target as well before it completes (copy-mode
// write-blocking). The job copies what the bitmap says is dirty.
//
// Ranges in flight: a background copy and a guest write copied to the target must not overlap in
// time, or an older copy could land on the target after the newer guest data (QEMU's
// mirror_wait_on_conflicts). Both register their range, aligned to the bitmap's granularity, and
// wait for overlapping ranges first.
//
// Lifetime: shared by the job and the filter, so a guest write that is still running when the job
// goes away finds the core intact; the job detaches its listener before it is destroyed.
// Threading: everything on the daemon's main loop.

#include <cstdint>
#include <memory>
#include <vector>

#include "aio/sync.h"
#include "aio/task.h"
#include "base/result.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/graph/node.h"
#include "block/io/io_vector.h"

namespace strata::block::mirror {

// QAPI MirrorCopyMode.
enum class CopyMode { kBackground, kWriteBlocking };

// How a write reaches a node.
enum class WriteMethod { kCopy, kZero, kDiscard };

class MirrorCore {
 public:
  // What the filter reports to the job that is running.
  class Listener {
   public:
    virtual ~Listener() = default;
    // New dirty data: the copy loop should look again.
    virtual void dirtied() = 0;
    // A guest write is being copied to the target (bytes), or was (done: success or not).
    virtual void active_write_started(uint64_t bytes) = 0;
    virtual void active_write_finished(uint64_t bytes, bool copied) = 0;
    // Copying a guest write to the target failed with `error` (an errno): the on-target-error
    // policy decides (QEMU's mirror_error_action for an active write).
    virtual void active_write_failed(int error) = 0;
  };

  MirrorCore(std::shared_ptr<Node> target, uint64_t length, uint32_t granularity, CopyMode mode)
      : target_(std::move(target)), dirty_("", length, granularity), copy_mode_(mode) {}
  MirrorCore(const MirrorCore&) = delete;
  MirrorCore& operator=(const MirrorCore&) = delete;

  Node& target() const { return *target_; }
  bitmap::DirtyBitmap& dirty() { return dirty_; }
  uint64_t granularity() const { return dirty_.granularity(); }
  CopyMode copy_mode() const { return copy_mode_; }
  void set_copy_mode(CopyMode mode) { copy_mode_ = mode; }
  // query-block-jobs `actively-synced`: in write-blocking mode, every guest write since the last
  // time nothing was dirty has reached the target.
  bool actively_synced() const { return actively_synced_; }
  void set_actively_synced(bool synced) { actively_synced_ = synced; }

  void set_listener(Listener* listener) { listener_ = listener; }
  // Guest writes stop going to the target (the job failed or is being cancelled).
  void stop_copying() { copying_ = false; }
  // The filter forwards to its child and nothing else from now on (the job is ending).
  void stop() {
    stopped_ = true;
    copying_ = false;
  }
  bool stopped() const { return stopped_; }
  // QEMU's should_copy_to_target.
  bool copies_to_target() const {
    return copying_ && !stopped_ && copy_mode_ == CopyMode::kWriteBlocking;
  }

  // A guest write of [offset, offset + bytes) reached the source (or failed to): the range is
  // dirty now (background mode).
  void mark_dirty(uint64_t offset, uint64_t bytes);

  // ---- ranges in flight -------------------------------------------------------------------
  // A registered range; unregisters and wakes the waiters when destroyed.
  class RangeLock {
   public:
    RangeLock(MirrorCore& core, uint64_t start, uint64_t end);
    ~RangeLock();
    RangeLock(const RangeLock&) = delete;
    RangeLock& operator=(const RangeLock&) = delete;

   private:
    MirrorCore& core_;
    uint64_t start_;
    uint64_t end_;
  };
  // Whether a registered range overlaps [start, end).
  bool overlaps(uint64_t start, uint64_t end) const;
  // Suspends until no registered range overlaps [start, end). Register right after it returns,
  // without suspending in between.
  aio::Task<void> wait_for_overlaps(uint64_t start, uint64_t end);
  // [offset, offset + bytes) widened to whole granules.
  uint64_t align_down(uint64_t offset) const { return offset - offset % granularity(); }
  uint64_t align_up(uint64_t offset) const { return align_down(offset + granularity() - 1); }

  // ---- write-blocking mode ----------------------------------------------------------------
  // QEMU's do_sync_target_write: a guest write that reached the source goes to the target too.
  // Granules at the edges that are already dirty are left to the background copy; the inner
  // granules are clean once the write lands. A failure marks the range dirty again and reports
  // to the listener. `qiov` is the guest's data for kCopy (nullptr otherwise). Call with the
  // range locked.
  aio::Task<void> write_to_target(WriteMethod method, uint64_t offset, uint64_t bytes,
                                  const IoVector* qiov, uint32_t flags);

 private:
  std::shared_ptr<Node> target_;
  bitmap::DirtyBitmap dirty_;
  CopyMode copy_mode_;
  bool actively_synced_ = false;
  bool copying_ = true;
  bool stopped_ = false;
  Listener* listener_ = nullptr;
  struct Range {
    uint64_t start;
    uint64_t end;
    const RangeLock* owner;
  };
  std::vector<Range> ranges_;
  aio::CoQueue range_waiters_;
};

}  // namespace strata::block::mirror
