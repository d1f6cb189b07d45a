#pragma once
// qcow2 reference counts (qcow2.rst "Host cluster management"): the refcount table, a cache of
// refcount blocks, first-fit cluster allocation and refcount updates, including allocating new
// refcount blocks and growing the refcount table (QEMU's alloc_refcount_block and
// qcow2_refcount_area).
//
// Write-back: refcount changes stay in the cache (dirty blocks) until write_back() — called by
// the node before it writes L2 slices that use new clusters, on flush and when the cache is over
// capacity. Ordering guarantees (what keeps a crashed image free of corruption, so that
// `qemu-img check` finds at worst leaks):
// - a new refcount block is written, together with the dirty blocks holding its own refcount,
//   and flushed before the refcount table points at it;
// - a grown refcount table (and the blocks describing it) is written and flushed before the
//   header points at it, and the header switch is flushed before the old table is freed;
// - allocate() changes cached refcounts only: the caller must call write_back() and flush the
//   file before an L2 entry using the clusters reaches the file (Qcow2Node::write_back_l2);
// - refcount drops must not reach the file before the L2 entries that stopped using the
//   clusters: write_back() first runs the hook given to set_write_back_hook (the node writes its
//   dirty L2 slices and flushes there when a drop is pending).
//
// Concurrency: not re-entrant. Every call must be made by the holder of the node's metadata mutex
// (Qcow2Node::meta_), on the node's home loop.

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/drivers/qcow2/header.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

// Stores a refcount table entry or an L1/L2 entry big-endian (format.h has the loads).
inline void put_be64(uint8_t* p, uint64_t value) {
  for (int i = 7; i >= 0; --i) {
    p[i] = static_cast<uint8_t>(value);
    value >>= 8;
  }
}

// Refcount entry `index` of a refcount block with 2^order-bit entries (QEMU's get_refcount_roN /
// set_refcount_roN: sub-byte widths are packed from the least significant bit, wider ones are
// big-endian).
uint64_t refcount_entry(const uint8_t* block, uint32_t order, uint64_t index);
void set_refcount_entry(uint8_t* block, uint32_t order, uint64_t index, uint64_t value);

class Refcounts {
 public:
  // `header` is the node's header: its refcount_table_offset/refcount_table_clusters are kept in
  // step when the table moves. `table` holds the table's entries as read from the file.
  // `image_end` is the image file's length: clusters at or past it are never overlapped by a
  // grown refcount table unless the refcounts say they are free.
  Refcounts(Node& file, Header& header, std::vector<uint64_t> table, uint64_t cache_blocks,
            uint64_t image_end);

  // Refcount of host cluster `cluster_index` (0 for clusters no refcount block describes).
  aio::Task<Result<uint64_t>> get(uint64_t cluster_index);
  // Allocates `clusters` contiguous host clusters (first fit from the free-cluster hint; every
  // cluster handed out had refcount 0), sets their refcounts to 1 on disk and returns the host
  // offset of the first.
  aio::Task<Result<uint64_t>> allocate(uint64_t clusters);
  // Adds `addend` to the refcount of every host cluster overlapping [offset, offset + length),
  // allocating refcount blocks as needed. Fails with EINVAL on overflow and kCorrupt/EIO when a
  // refcount would drop below 0. A cluster whose refcount reaches 0 becomes allocatable again.
  aio::Task<Result<void>> update(uint64_t offset, uint64_t length, int64_t addend);

  // Writes every dirty refcount block to the file (after the hook, see above). No flush.
  aio::Task<Result<void>> write_back();
  bool has_dirty() const { return !dirty_.empty(); }
  bool over_capacity() const { return index_.size() > cache_capacity_; }
  // Run by write_back() before it writes anything (the node's ordering of drops after L2 writes).
  void set_write_back_hook(std::function<aio::Task<Result<void>>()> hook) {
    write_back_hook_ = std::move(hook);
  }
  // Metadata I/O straight to the file node's driver, bypassing the request layer (write-back
  // during close and inactivation, when the graph may be drained).
  void set_direct_io(bool direct) { direct_io_ = direct; }
  // Drops the cached blocks that are not dirty.
  void drop_clean();
  // Drops the clean blocks nobody used since the previous call (cache-clean-interval).
  void drop_unused();

  // The end of every cluster in use or handed out (at least the image file's length at open).
  uint64_t allocated_end_offset() const { return allocated_end_ << cluster_bits_; }

  uint64_t table_entries() const { return table_.size(); }
  // One past the last refcount table entry that is not 0 (QEMU's max_refcount_table_index + 1):
  // the overlap checks look at no entry past it.
  uint64_t used_entries() const { return used_entries_; }
  // Refcount table entry `index` as stored (0 past the table); for the overlap checks.
  uint64_t table_entry(uint64_t index) const { return index < table_.size() ? table_[index] : 0; }
  uint64_t free_cluster_hint() const { return free_hint_; }
  uint64_t cache_capacity() const { return cache_capacity_; }

 private:
  using Block = std::shared_ptr<std::vector<uint8_t>>;
  // The refcount block at table index `index`, or nullptr when the entry is 0 (or past the
  // table).
  aio::Task<Result<Block>> load_block(uint64_t index);
  // Like load_block, but creates the block (and grows the table) when it does not exist.
  aio::Task<Result<Block>> ensure_block(uint64_t index);
  // Finds `clusters` contiguous clusters with refcount 0 from the hint; refcounts stay unchanged
  // but the hint moves past them, so nested allocations never return them again.
  aio::Task<Result<uint64_t>> find_free(uint64_t clusters);
  // Moves the refcount table to a larger one at the end of the image, so that it has at least
  // `min_entries` entries (QEMU's qcow2_refcount_area).
  aio::Task<Result<void>> grow_table(uint64_t min_entries);
  aio::Task<Result<void>> write(uint64_t offset, const void* data, uint64_t bytes);
  aio::Task<Result<void>> barrier();
  void cache_insert(uint64_t offset, Block block);
  void recount_used_entries();
  void mark_dirty(uint64_t offset) { dirty_.insert(offset); }

  Node& file_;
  Header& header_;
  std::vector<uint64_t> table_;
  uint64_t used_entries_ = 0;  // see used_entries()
  uint64_t cluster_size_;
  uint32_t cluster_bits_;
  uint32_t order_;       // log2(refcount bits)
  uint32_t block_bits_;  // log2(entries per refcount block)
  uint64_t max_refcount_;
  // Every cluster below the hint has a refcount != 0 or was just handed out by find_free.
  uint64_t free_hint_ = 0;
  // A cluster index past every cluster handed out and past the end of the image file.
  uint64_t allocated_end_ = 0;
  uint64_t cache_capacity_;
  std::list<std::pair<uint64_t, Block>> lru_;  // most recently used first
  std::unordered_map<uint64_t, std::list<std::pair<uint64_t, Block>>::iterator> index_;
  std::set<uint64_t> dirty_;           // offsets of cached blocks that differ from the file
  std::unordered_set<uint64_t> used_;  // offsets of cached blocks used since drop_unused()
  std::function<aio::Task<Result<void>>()> write_back_hook_;
  bool direct_io_ = false;
};

}  // namespace strata::block::qcow2
