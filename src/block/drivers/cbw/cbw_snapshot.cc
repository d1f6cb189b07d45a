// The frozen view of a copy-before-write node (QEMU's cbw_snapshot_read_lock/unlock,
// cbw_co_preadv_snapshot, cbw_co_snapshot_block_status, cbw_co_pdiscard_snapshot).

#include <algorithm>

#include "block/drivers/cbw/cbw_node.h"
#include "block/io/request.h"

namespace strata::block {

namespace {

// Length of the run at `offset` (at most `bytes`) whose chunks all have the state of the first;
// `dirty` receives that state (QEMU's bdrv_dirty_bitmap_status).
uint64_t bitmap_run(const bitmap::DirtyBitmap& bitmap, uint64_t offset, uint64_t bytes,
                    bool& dirty) {
  dirty = bitmap.test(offset);
  std::optional<uint64_t> next = dirty ? bitmap.next_zero(offset) : bitmap.next_dirty(offset);
  const uint64_t end = next ? *next : bitmap.size();
  return std::min(bytes, end - offset);
}

Error no_access() {
  return Error(ErrorKind::kPermission, "Permission denied", EACCES);
}

}  // namespace

Result<CbwNode::SnapshotRun> CbwNode::snapshot_run(uint64_t offset, uint64_t bytes) const {
  bool readable = false;
  uint64_t run = bitmap_run(*access_bitmap_, offset, bytes, readable);
  if (snapshot_broken_ || !readable) {
    return no_access();
  }
  bool done = false;
  run = bitmap_run(*done_bitmap_, offset, run, done);
  if (done) {
    return SnapshotRun{&target(), run, false};
  }
  return SnapshotRun{&file(), run, true};
}

aio::Task<void> CbwNode::wait_frozen_reads(uint64_t offset, uint64_t bytes) {
  auto overlaps = [&] {
    return std::any_of(frozen_reads_.begin(), frozen_reads_.end(), [&](const FrozenRead* read) {
      return read->offset < offset + bytes && offset < read->offset + read->bytes;
    });
  };
  while (overlaps()) {
    co_await frozen_read_ended_.wait();
  }
}

aio::Task<Result<void>> CbwNode::snapshot_preadv(uint64_t offset, uint64_t bytes, IoVector qiov) {
  uint64_t done = 0;
  while (done < bytes) {
    auto run = snapshot_run(offset + done, bytes - done);
    if (!run) {
      co_return std::move(run).error();
    }
    IoVector part = qiov.slice(done, run->bytes);
    Result<void> read = ok();
    if (run->from_file) {
      FrozenRead frozen{offset + done, run->bytes};
      frozen_reads_.push_back(&frozen);
      read = co_await io::preadv(*run->child, offset + done, std::move(part), 0);
      frozen_reads_.erase(std::find(frozen_reads_.begin(), frozen_reads_.end(), &frozen));
      frozen_read_ended_.notify_all();
    } else {
      read = co_await io::preadv(*run->child, offset + done, std::move(part), 0);
    }
    if (!read) {
      co_return read;
    }
    done += run->bytes;
  }
  co_return ok();
}

aio::Task<Result<BlockStatus>> CbwNode::snapshot_block_status(uint64_t offset, uint64_t bytes) {
  auto run = snapshot_run(offset, bytes);
  if (!run) {
    co_return std::move(run).error();
  }
  FrozenRead frozen{offset, run->bytes};
  if (run->from_file) {
    frozen_reads_.push_back(&frozen);
  }
  Result<BlockStatus> status = co_await io::block_status(*run->child, offset, run->bytes);
  if (run->from_file) {
    frozen_reads_.erase(std::find(frozen_reads_.begin(), frozen_reads_.end(), &frozen));
    frozen_read_ended_.notify_all();
  }
  co_return status;
}

aio::Task<Result<void>> CbwNode::snapshot_discard(uint64_t offset, uint64_t bytes) {
  // Whole clusters only: part of a cluster stays readable.
  const uint64_t cluster = block_copy_->cluster_size();
  const uint64_t start = (offset + cluster - 1) / cluster * cluster;
  const uint64_t end = offset + bytes == length() ? length() : (offset + bytes) / cluster * cluster;
  if (end <= start) {
    co_return ok();
  }
  access_bitmap_->reset(start, end - start);
  block_copy_->copy_bitmap().reset(start, end - start);  // a later guest write copies nothing
  co_return co_await io::pdiscard(target(), start, end - start);
}

}  // namespace strata::block
