#pragma once
// The L2 table cache: least-recently-used slices of L2 tables (QEMU's Qcow2Cache with
// l2-cache-entry-size slices). A slice is `slice_bytes` of one table, kept as host-endian 64-bit
// words. Read-only for now: slices are never dirty.
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

  uint64_t capacity() const { return capacity_; }
  uint32_t slice_bytes() const { return slice_bytes_; }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }
  size_t cached() const { return index_.size(); }

 private:
  void insert(uint64_t slice_offset, L2Slice slice);

  uint64_t capacity_;
  uint32_t slice_bytes_;
  // Most recently used first.
  std::list<std::pair<uint64_t, L2Slice>> lru_;
  std::unordered_map<uint64_t, std::list<std::pair<uint64_t, L2Slice>>::iterator> index_;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace strata::block::qcow2
