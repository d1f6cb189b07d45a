// External data files (qcow2.rst "External data file name" and the data-file / data-file-raw
// feature bits): what the writer does differently when guest data lives in another file.
// - A guest cluster lives at the same offset of the data file (QEMU's do_alloc_cluster_offset),
//   so with data-file-raw the data file always reads as the guest disk;
// - data clusters are not refcounted: the metadata file's refcounts cover only metadata, and a
//   cluster that stops being used is only discarded in the data file (qcow2_free_any_cluster);
// - write-zeroes reaches a raw data file too (subcluster_write.cc).

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::release_data_cluster(uint64_t entry, bool pass_discard) {
  if (data_file_ == nullptr) {
    co_return co_await release_entry(entry);
  }
  const ClusterKind kind = cluster_kind(entry);
  if (pass_discard && (kind == ClusterKind::kNormal || kind == ClusterKind::kZeroAlloc)) {
    // Advisory, like QEMU's bdrv_pdiscard of the data file: a failure changes nothing the guest
    // sees.
    Result<void> discarded =
        co_await io::pdiscard(data_file(), entry & kL2OffsetMask, header_.cluster_size());
    ignore_error(std::move(discarded), "discard of an unused data cluster is advisory");
  }
  co_return ok();
}

aio::Task<Result<void>> Qcow2Node::resize_data_file(uint64_t old_size, uint64_t new_size,
                                                    bool exact) {
  Result<void> resized = co_await io::truncate(data_file(), new_size, exact);
  if (!resized) {
    co_return resized.error().with_prefix("Failed to resize the external data file");
  }
  if (!data_file_raw() || new_size <= old_size) {
    co_return ok();
  }
  // Metadata preallocation of the new clusters: each maps its own offset of the data file.
  const uint32_t cluster_bits = header_.cluster_bits;
  const uint64_t first = (old_size + header_.cluster_size() - 1) >> cluster_bits;
  const uint64_t end = (new_size + header_.cluster_size() - 1) >> cluster_bits;
  for (uint64_t cluster = first; cluster < end; ++cluster) {
    Result<L2Ref> ref = co_await ensure_l2_table(cluster);
    if (!ref) {
      co_return std::move(ref).error();
    }
    if (cluster_kind(ref->entry) != ClusterKind::kUnallocated) {
      continue;
    }
    Result<void> set =
        co_await set_l2_entry_and_bitmap(*ref, (cluster << cluster_bits) | kOflagCopied,
                                         header_.extended_l2() ? kBitmapAllAlloc : 0);
    if (set) {
      set = co_await trim_caches();
    }
    if (!set) {
      co_return set;
    }
  }
  co_return co_await sync_metadata();
}

}  // namespace strata::block::qcow2
