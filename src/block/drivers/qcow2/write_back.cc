// Write-back of the qcow2 metadata caches (QEMU's qcow2-cache.c ordering; see qcow2_node.h): the
// dependencies between dirty L2 slices and dirty refcount blocks, flush, and the synchronous
// write-back of close, inactivation and reopen.

#include "aio/event_loop.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/overlap.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::meta_write(uint64_t offset, IoVector qiov) {
  Result<void> written = co_await write_metadata(file(), offset, qiov, direct_io_);
  co_return written;
}

aio::Task<Result<void>> Qcow2Node::meta_flush() {
  Result<void> flushed = co_await flush_metadata(file(), direct_io_);
  co_return flushed;
}

aio::Task<Result<void>> Qcow2Node::write_back_l2() {
  L2Cache& cache = map_->l2_cache();
  if (!cache.has_dirty()) {
    co_return ok();
  }
  // Invariant: never both l2_needs_refcounts_ and refcounts_need_l2_ (the setters break the
  // cycle), so this write_back runs no hook that comes back here.
  bool flush = l2_needs_flush_;
  if (l2_needs_refcounts_ && refcounts_ != nullptr && refcounts_->has_dirty()) {
    Result<void> counted = co_await refcounts_->write_back();
    if (!counted) {
      co_return counted;
    }
    flush = true;
  }
  if (flush) {
    Result<void> flushed = co_await meta_flush();
    if (!flushed) {
      co_return flushed;
    }
  }
  l2_needs_refcounts_ = false;
  l2_needs_flush_ = false;
  for (uint64_t slice_offset : cache.dirty_slices()) {
    std::vector<uint8_t> raw = cache.encode(slice_offset);
    Result<void> written =
        co_await pre_write_overlap_check(kOverlapActiveL2, slice_offset, raw.size(), false);
    if (!written) {
      co_return written;
    }
    written = co_await meta_write(slice_offset, IoVector(raw.data(), raw.size()));
    if (!written) {
      co_return written;
    }
    cache.mark_clean(slice_offset);
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::before_refcount_write_back() {
  if (!refcounts_need_l2_) {
    co_return ok();
  }
  Result<void> written = co_await write_back_l2();
  if (!written) {
    co_return written;
  }
  Result<void> flushed = co_await meta_flush();
  if (!flushed) {
    co_return flushed;
  }
  refcounts_need_l2_ = false;
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::l2_depends_on_new_clusters() {
  if (refcounts_need_l2_) {
    // QEMU's qcow2_cache_set_dependency breaking a cycle: write the pending drops (after the
    // L2 slices they wait for) before the L2 cache starts depending on the refcounts.
    Result<void> counted = co_await refcounts_->write_back();
    if (!counted) {
      co_return counted;
    }
    refcounts_need_l2_ = false;
  }
  l2_needs_refcounts_ = true;
  l2_needs_flush_ = true;
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::refcounts_depend_on_l2() {
  if (l2_needs_refcounts_) {
    Result<void> written = co_await write_back_l2();
    if (!written) {
      co_return written;
    }
  }
  refcounts_need_l2_ = true;
  co_return ok();
}

void Qcow2Node::forget_l2_table(uint64_t l2_offset) {
  const uint64_t table_entries = uint64_t{1} << header_.l2_bits();
  for (uint64_t first = 0; first < table_entries; first += map_->slice_entries()) {
    map_->l2_cache().discard(map_->slice_offset(l2_offset, first));
  }
}

aio::Task<Result<void>> Qcow2Node::write_caches() {
  if (refcounts_ == nullptr) {
    co_return ok();
  }
  Result<void> written = co_await write_back_l2();
  if (!written) {
    co_return written;
  }
  written = co_await refcounts_->write_back();
  co_return written;
}

aio::Task<Result<void>> Qcow2Node::trim_caches() {
  if (map_->l2_cache().over_capacity()) {
    Result<void> written = co_await write_back_l2();
    if (!written) {
      co_return written;
    }
  }
  if (refcounts_ != nullptr && refcounts_->over_capacity()) {
    Result<void> written = co_await refcounts_->write_back();
    if (!written) {
      co_return written;
    }
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::co_flush() {
  auto meta = co_await meta_.scoped_lock();
  Result<void> written = co_await write_caches();
  co_return written;
}

aio::Task<Result<void>> Qcow2Node::write_caches_and_flush() {
  {
    auto meta = co_await meta_.scoped_lock();
    Result<void> written = co_await write_caches();
    if (!written) {
      co_return written;
    }
  }
  Result<void> flushed = co_await io::flush(file());
  co_return flushed;
}

Result<void> Qcow2Node::write_back_now() {
  if (refcounts_ == nullptr ||
      (!map_->l2_cache().has_dirty() && !refcounts_->has_dirty() && !file_grown_ahead_)) {
    return ok();
  }
  auto loop = aio::EventLoop::create(16);
  if (!loop) {
    return std::move(loop).error();
  }
  direct_io_ = true;
  refcounts_->set_direct_io(true);
  auto body = [](Qcow2Node& node) -> aio::Task<Result<void>> {
    Result<void> written = co_await node.write_caches();
    if (!written) {
      co_return written;
    }
    if (node.file_grown_ahead_) {
      // Back to the clusters in use (the part ensure_file_covers added past them holds nothing).
      const uint64_t end = node.refcounts_->allocated_end_offset();
      if (end < node.file().length()) {
        Result<void> shrunk = co_await node.file().co_truncate(end, true);
        ignore_error(std::move(shrunk), "the file only stays longer than needed");
      }
      node.file_grown_ahead_ = false;
    }
    Result<void> flushed = co_await node.meta_flush();
    co_return flushed;
  };
  Result<void> done = (*loop)->block_on(body(*this));
  direct_io_ = false;
  refcounts_->set_direct_io(false);
  return done;
}

Result<void> Qcow2Node::on_inactivate() {
  // QEMU's qcow2_inactivate: the persistent bitmaps first (a failure to store loses them but
  // still inactivates), then the caches.
  (void)store_bitmaps_now(/*release=*/true);
  Result<void> written = write_back_now();
  if (!written) {
    return written;
  }
  // QEMU's qcow2_inactivate: an image whose refcounts are exact is left clean.
  mark_clean_at_close();
  map_->l2_cache().drop_clean();
  if (refcounts_ != nullptr) {
    refcounts_->drop_clean();
  }
  return ok();
}

Result<std::function<void()>> Qcow2Node::prepare_reopen(const DriverOptions& options) {
  auto action = Node::prepare_reopen(options);
  if (!action) {
    return action;
  }
  // QEMU's qcow2_reopen_prepare writes the caches back (the node may become read-only).
  Result<void> written = write_back_now();
  if (!written) {
    return std::move(written).error();
  }
  return action;
}

}  // namespace strata::block::qcow2
