// Changing the refcount width of an image (qemu-img amend -o refcount_bits=N; QEMU's
// qcow2_change_refcount_order). The counts are read through the current structure into an
// in-memory table, a complete new structure of the new width is written into clusters that are
// free in both, the header is switched to it (table offset, size and refcount order in one
// write), and only then is the old structure freed through the new one. A crash at any point
// leaves either structure in use, at worst with leaked clusters.

#include <cinttypes>
#include <cstdio>
#include <vector>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/qcow2/repair.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

aio::Task<Result<void>> Qcow2Node::change_refcount_order(uint32_t order) {
  // Everything cached reaches the file first: the new structure is built from the file's view.
  Result<void> written = co_await write_caches();
  if (written) {
    written = co_await io::flush(file());
  }
  if (!written) {
    co_return written;
  }
  const uint32_t new_bits = uint32_t{1} << order;
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t clusters =
      (refcounts_->allocated_end_offset() + cluster_size - 1) >> header_.cluster_bits;
  std::vector<uint64_t> imrt(clusters, 0);
  for (uint64_t i = 0; i < clusters; ++i) {
    Result<uint64_t> count = co_await refcounts_->get(i);
    if (!count) {
      co_return std::move(count).error();
    }
    if (new_bits < 64 && (*count >> new_bits) != 0) {
      char text[160];
      std::snprintf(text, sizeof(text),
                    "Cannot decrease refcount entry width to %u bits: Cluster at offset %#" PRIx64
                    " has a refcount of %" PRIu64,
                    new_bits, i << header_.cluster_bits, *count);
      co_return Error(ErrorKind::kInvalidArgument, text, EINVAL);
    }
    imrt[i] = *count;
    if (i % 4096 == 4095) {
      co_await aio::EventLoop::current()->yield();  // long walks let the stack unwind
    }
  }
  // The old structure, freed once the header no longer points at it.
  std::vector<uint64_t> old_clusters;
  for (uint64_t i = 0; i < refcounts_->table_entries(); ++i) {
    const uint64_t block = refcounts_->table_entry(i) & kRefcountTableOffsetMask;
    if (block != 0) {
      old_clusters.push_back(block);
    }
  }
  for (uint32_t i = 0; i < header_.refcount_table_clusters; ++i) {
    old_clusters.push_back(header_.refcount_table_offset + i * cluster_size);
  }

  Header target = header_;
  target.refcount_order = order;
  Result<RebuiltRefcounts> rebuilt =
      co_await rebuild_refcount_structure(file(), target, imrt, /*set_refcount_order=*/true);
  if (!rebuilt) {
    co_return std::move(rebuilt).error();
  }
  const uint64_t cache_blocks = refcounts_->cache_capacity();
  header_.refcount_order = order;
  header_.refcount_table_offset = rebuilt->table_offset;
  header_.refcount_table_clusters = rebuilt->table_clusters;
  free_byte_offset_ = 0;
  Result<void> loaded = co_await load_refcounts(cache_blocks);
  if (!loaded) {
    co_return loaded;
  }
  for (uint64_t offset : old_clusters) {
    Result<void> freed = co_await refcounts_->update(offset, cluster_size, -1);
    if (!freed) {
      co_return freed;
    }
  }
  Result<void> counted = co_await refcounts_->write_back();
  if (!counted) {
    co_return counted;
  }
  co_return co_await io::flush(file());
}

}  // namespace strata::block::qcow2
