#pragma once
// The L2 table cache: least-recently-used slices of L2 tables (QEMU's Qcow2Cache with
// l2-cache-entry-size slices). A slice is `slice_bytes` of one table, kept as host-endian 64-bit
// words.
//
// Write-back: the writer changes entries in the cache (set_entry marks the slice dirty) and the
// node writes dirty slices back later (Qcow2Node::write_back_l2, which first makes the refcounts
// and data they depend on durable). A dirty slice is never evicted: the cache may hold more than
// `capacity` slices until the node writes them back (over_capacity()).
//
// Concurrency: runs on the node's home loop. Readers call get() without the node's metadata
// mutex; a slice is loaded once even when several requests miss it at the same time (later ones
// wait for the first load), so a slice that was loaded, changed and written back can never be
// replaced by an older copy read concurrently. Callers hold their slice by shared_ptr, so eviction
// never frees a slice in use. set_entry/mark_clean/dirty_slices require the metadata mutex.

#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aio/sync.h"
#include "aio/task.h"
#include "base/result.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

using L2Slice = std::shared_ptr<const std::vector<uint64_t>>;

class L2Cache {
 public:
  // `capacity` slices of `slice_bytes` each (at least 1 slice).
  L2Cache(uint64_t capacity, uint32_t slice_bytes);

  // The slice starting at byte `slice_offset` of `file` (zeroes past its end).
  aio::Task<Result<L2Slice>> get(Node& file, uint64_t slice_offset);
  // Sets word `index` of the slice at `slice_offset` (loading it when it is not cached) and marks
  // the slice dirty. Readers holding the slice see the new value.
  aio::Task<Result<void>> set_entry(Node& file, uint64_t slice_offset, uint32_t index,
                                    uint64_t value);
  // Stores a whole slice the caller has just written to the file (a new L2 table), clean.
  void put_clean(uint64_t slice_offset, std::vector<uint64_t> words);
  // Forgets the slice at `slice_offset`, dirty or not (QEMU's qcow2_cache_discard): its cluster
  // was freed, so its contents must never be written back over whatever reuses the cluster.
  void discard(uint64_t slice_offset);
  // Drops every clean slice; dirty ones stay (inactivation after a write-back, tests,
  // cache-clean-interval).
  void drop_clean();
  // Drops the clean slices nobody used since the previous call (QEMU's
  // qcow2_cache_clean_unused, run every cache-clean-interval seconds).
  void drop_unused();

  // Dirty slices, by offset, and their words (big-endian on-disk image) for writing back.
  std::vector<uint64_t> dirty_slices() const;
  std::vector<uint8_t> encode(uint64_t slice_offset) const;
  // The slice at `slice_offset` now matches the file.
  void mark_clean(uint64_t slice_offset);
  bool has_dirty() const { return dirty_count_ != 0; }
  // More slices cached than the capacity (all the extra ones are dirty).
  bool over_capacity() const { return index_.size() > capacity_; }

  uint64_t capacity() const { return capacity_; }
  uint32_t slice_bytes() const { return slice_bytes_; }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }
  size_t cached() const { return index_.size(); }

 private:
  struct Entry {
    uint64_t offset;
    std::shared_ptr<std::vector<uint64_t>> words;
    bool dirty = false;
    bool used = true;  // looked up since the last drop_unused()
  };
  using Lru = std::list<Entry>;
  // A load in progress: later misses of the same slice wait for it.
  struct Loading {
    aio::Event done;
    Result<void> result = ok();
  };
  aio::Task<Result<Lru::iterator>> find_or_load(Node& file, uint64_t slice_offset);
  Lru::iterator insert(uint64_t slice_offset, std::shared_ptr<std::vector<uint64_t>> words);
  void evict_clean();

  uint64_t capacity_;
  uint32_t slice_bytes_;
  Lru lru_;  // most recently used first
  std::unordered_map<uint64_t, Lru::iterator> index_;
  std::unordered_map<uint64_t, std::shared_ptr<Loading>> loading_;
  size_t dirty_count_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace strata::block::qcow2
