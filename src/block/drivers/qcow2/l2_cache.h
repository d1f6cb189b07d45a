#pragma once
// The L2 table cache: least-recently-used slices of L2 tables (QEMU's Qcow2Cache with
// l2-cache-entry-size slices). A slice is `slice_bytes` of one table, kept as host-endian 64-bit
// words. Slices are never dirty: the writer stores L2 entries in the file first and then calls
// update() so that the cached copy matches the file.
//
// Concurrency: runs on the node's home loop. Two requests missing the same slice may both read
// it; the later insert replaces the earlier one (identical contents), and callers hold their
// slice by shared_ptr, so eviction never frees a slice in use.

#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

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
  // Drops every slice (inactivation, tests).
  void clear();
  // Sets word `index` of the cached slice at `slice_offset`, if it is cached. Readers holding the
  // slice see the new value (the caller holds the node's exclusive lock, so none is in the middle
  // of a lookup).
  void update(uint64_t slice_offset, uint32_t index, uint64_t value);

  uint64_t capacity() const { return capacity_; }
  uint32_t slice_bytes() const { return slice_bytes_; }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }
  size_t cached() const { return index_.size(); }

 private:
  using MutableSlice = std::shared_ptr<std::vector<uint64_t>>;
  void insert(uint64_t slice_offset, MutableSlice slice);

  uint64_t capacity_;
  uint32_t slice_bytes_;
  // Most recently used first.
  std::list<std::pair<uint64_t, MutableSlice>> lru_;
  std::unordered_map<uint64_t, std::list<std::pair<uint64_t, MutableSlice>>::iterator> index_;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace strata::block::qcow2
