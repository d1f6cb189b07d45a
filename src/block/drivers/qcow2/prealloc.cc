// Preallocation of a grown area (qemu-img resize --preallocation; QEMU's qcow2_co_truncate with
// metadata, falloc or full): every guest cluster of the new area that has no host cluster gets
// one, so later writes there never allocate. metadata only maps the clusters (the file stays
// sparse, so they read as zeroes), falloc also reserves their space in the file, full writes
// zeroes into them.

#include <algorithm>
#include <vector>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::preallocate_growth(uint64_t from, uint64_t to,
                                                      Preallocation mode) {
  if (mode == Preallocation::kOff || from >= to) {
    co_return ok();
  }
  if (refcounts_ == nullptr) {
    co_return Error::from_errno(EACCES, "qcow2: the image is opened read-only");
  }
  if (data_file_ != nullptr) {
    co_return Error(ErrorKind::kUnsupported,
                    "Preallocation of a resized image with an external data file is not "
                    "supported",
                    ENOTSUP);
  }
  auto exclusive = co_await lock_.scoped_write_lock();
  auto meta = co_await meta_.scoped_lock();
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t last = (to - 1) >> cluster_bits;
  for (uint64_t cluster = from >> cluster_bits; cluster <= last;) {
    Result<L2Ref> table = co_await ensure_l2_table(cluster);
    if (!table) {
      co_return std::move(table).error();
    }
    // The run of unmapped clusters from here, within this L2 table.
    const uint64_t table_last = ((table->l1_index + 1) << header_.l2_bits()) - 1;
    const uint64_t stop = std::min(last, table_last);
    uint64_t count = 0;
    while (cluster + count <= stop) {
      Result<L2Ref> ref = co_await l2_ref(cluster + count);
      if (!ref) {
        co_return std::move(ref).error();
      }
      if ((ref->entry & (kL2OffsetMask | kOflagCompressed)) != 0) {
        break;
      }
      ++count;
    }
    if (count == 0) {
      ++cluster;  // already has a host cluster (the partial one at the old end)
      continue;
    }
    Result<uint64_t> host = co_await refcounts_->allocate(count);
    if (!host) {
      co_return std::move(host).error();
    }
    const uint64_t bytes = count << cluster_bits;
    Result<void> filled = co_await ensure_file_covers(*host + bytes);
    if (filled && mode == Preallocation::kFalloc) {
      filled = co_await io::pwrite_zeroes(file(), *host, bytes, 0);
    } else if (filled && mode == Preallocation::kFull) {
      if (zero_cluster_.size() < cluster_size) {
        zero_cluster_.assign(cluster_size, 0);
      }
      for (uint64_t done = 0; filled && done < bytes; done += cluster_size) {
        filled = co_await io::pwrite(file(), *host + done, zero_cluster_.data(), cluster_size);
      }
    }
    if (!filled) {
      ignore_error(co_await refcounts_->update(*host, bytes, -1),
                   "the clusters of a failed preallocation only leak");
      co_return filled.error().with_prefix("Could not preallocate the new area");
    }
    Result<void> ordered = co_await l2_depends_on_new_clusters();
    if (!ordered) {
      co_return ordered;
    }
    std::vector<uint64_t> entries(count);
    for (uint64_t i = 0; i < count; ++i) {
      entries[i] = (*host + (i << cluster_bits)) | kOflagCopied;
    }
    Result<L2Ref> first = co_await l2_ref(cluster);
    if (!first) {
      co_return std::move(first).error();
    }
    Result<void> written = co_await write_l2_entries(first->l2_offset, first->l2_index, entries);
    if (!written) {
      co_return written;
    }
    Result<void> trimmed = co_await trim_caches();
    if (!trimmed) {
      co_return trimmed;
    }
    cluster += count;
  }
  meta.unlock();
  co_return co_await write_caches_and_flush();
}

}  // namespace strata::block::qcow2
