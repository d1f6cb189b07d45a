#include "block/mirror/mirror_core.h"

#include <algorithm>

#include "block/io/request.h"

namespace strata::block::mirror {

void MirrorCore::mark_dirty(uint64_t offset, uint64_t bytes) {
  if (bytes == 0) {
    return;
  }
  actively_synced_ = false;
  dirty_.set(offset, bytes);
  if (listener_ != nullptr) {
    listener_->dirtied();
  }
}

MirrorCore::RangeLock::RangeLock(MirrorCore& core, uint64_t start, uint64_t end)
    : core_(core), start_(start), end_(end) {
  core_.ranges_.push_back({start_, end_, this});
}

MirrorCore::RangeLock::~RangeLock() {
  auto& ranges = core_.ranges_;
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(),
                              [this](const Range& range) { return range.owner == this; }),
               ranges.end());
  core_.range_waiters_.notify_all();
}

bool MirrorCore::overlaps(uint64_t start, uint64_t end) const {
  return std::any_of(ranges_.begin(), ranges_.end(), [start, end](const Range& range) {
    return range.start < end && start < range.end;
  });
}

aio::Task<void> MirrorCore::wait_for_overlaps(uint64_t start, uint64_t end) {
  while (overlaps(start, end)) {
    co_await range_waiters_.wait();
  }
}

aio::Task<void> MirrorCore::write_to_target(WriteMethod method, uint64_t offset, uint64_t bytes,
                                            const IoVector* qiov, uint32_t flags) {
  const uint64_t g = granularity();
  uint64_t skip = 0;
  // An unaligned head or tail granule that is dirty already: the background copy brings it
  // over (its bit cannot be cleared for a part of it).
  if (offset % g != 0 && dirty_.test(offset)) {
    skip = align_up(offset) - offset;
    if (bytes <= skip) {
      co_return;
    }
    offset += skip;
    bytes -= skip;
  }
  if ((offset + bytes) % g != 0 && dirty_.test(offset + bytes - 1)) {
    const uint64_t tail = (offset + bytes) % g;
    if (bytes <= tail) {
      co_return;
    }
    bytes -= tail;
  }
  const uint64_t clean_start = align_up(offset);
  const uint64_t clean_end = align_down(offset + bytes);
  if (clean_start < clean_end) {
    dirty_.reset(clean_start, clean_end - clean_start);
  }
  if (listener_ != nullptr) {
    listener_->active_write_started(bytes);
  }
  Result<void> written = ok();
  switch (method) {
    case WriteMethod::kCopy:
      written =
          co_await io::pwritev(*target_, offset, qiov->slice(skip, bytes), flags & kRequestFua);
      break;
    case WriteMethod::kZero:
      written = co_await io::pwrite_zeroes(*target_, offset, bytes,
                                           flags & (kRequestFua | kRequestMayUnmap));
      break;
    case WriteMethod::kDiscard:
      written = co_await io::pdiscard(*target_, offset, bytes);
      break;
  }
  if (listener_ != nullptr) {
    listener_->active_write_finished(bytes, written.ok());
  }
  if (!written) {
    // The whole area, widened to granules, is dirty again; the edges that were skipped were
    // dirty before and nobody could have cleaned them meanwhile (the range is locked).
    dirty_.set(align_down(offset), align_up(offset + bytes) - align_down(offset));
    actively_synced_ = false;
    if (listener_ != nullptr) {
      listener_->active_write_failed(written.error().errno_value());
    }
  }
}

}  // namespace strata::block::mirror
