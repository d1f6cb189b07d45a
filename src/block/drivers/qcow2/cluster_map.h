#pragma once
// "Where does this guest range live": the L1/L2 lookup of qcow2.rst "Cluster mapping" with
// extended L2 subclusters, following QEMU 10's qcow2_get_host_offset and
// count_contiguous_subclusters so that runs split where QEMU's do. Separated from data movement:
// the node reads data from wherever a Mapping points.

#include <cstdint>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "block/drivers/qcow2/header.h"
#include "block/drivers/qcow2/l2_cache.h"
#include "block/graph/node.h"

namespace strata::block::qcow2 {

// QEMU's QCow2SubclusterType (without INVALID, which is an error here).
enum class SubclusterType {
  kNormal,            // data at host_offset
  kZeroPlain,         // reads as zeroes, no host cluster
  kZeroAlloc,         // reads as zeroes, host cluster preallocated at host_offset
  kUnallocatedPlain,  // from the backing file (or zeroes)
  kUnallocatedAlloc,  // from the backing file, host cluster allocated (extended L2 only)
  kCompressed,        // one compressed cluster, described by the L2 entry
};

struct Mapping {
  SubclusterType type = SubclusterType::kUnallocatedPlain;
  // Length of the run starting at the queried offset with this type (and, for types with a host
  // cluster, contiguous on the host). Never crosses an L2 slice; compressed runs stay within one
  // cluster.
  uint64_t bytes = 0;
  // kNormal/kZeroAlloc/kUnallocatedAlloc: host offset of the queried guest offset.
  uint64_t host_offset = 0;
  // kCompressed: where the compressed bytes are and how many may belong to them.
  uint64_t compressed_offset = 0;
  uint64_t compressed_size = 0;
};

class ClusterMap {
 public:
  // `l1` holds the L1 entries stored in the file (the table may be longer; entries past the end
  // of the file read as zero, i.e. unallocated). `has_data_file`: offsets are in an external data
  // file, where offset 0 with the COPIED flag is a valid cluster.
  ClusterMap(const Header& header, std::vector<uint64_t> l1, bool has_data_file,
             uint64_t cache_slices, uint32_t cache_slice_bytes);

  // The run starting at guest `offset`, at most `bytes` long. Corrupt tables (unaligned offsets,
  // invalid subcluster bitmaps, zero clusters in a v2 image, compressed clusters with a data
  // file) fail with kCorrupt/EIO and QEMU's description of the corruption.
  aio::Task<Result<Mapping>> map(Node& file, uint64_t offset, uint64_t bytes);

  const std::vector<uint64_t>& l1() const { return l1_; }
  // After `strata img amend` changed the image's version (zero flags are valid from version 3).
  void set_version(uint32_t version) { version_ = version; }
  // ---- writer support (the caller holds the node's exclusive lock) ----
  // The in-memory L1 entry (0 past the entries read from the file).
  uint64_t l1_entry(uint64_t index) const { return index < l1_.size() ? l1_[index] : 0; }
  // Records an L1 entry the caller has written to the file.
  void set_l1_entry(uint64_t index, uint64_t entry) {
    if (index >= l1_.size()) {
      l1_.resize(index + 1, 0);
    }
    l1_[index] = entry;
  }
  // Replaces the active L1 (snapshot goto, L1 growth and shrink): `l1_size` entries, of which
  // `l1` holds the first ones (the rest are 0).
  void replace_l1(std::vector<uint64_t> l1, uint64_t l1_size) {
    l1_ = std::move(l1);
    l1_size_ = l1_size;
  }
  // L2 entries per cache slice, and the slice of the L2 table at `l2_offset` holding `l2_index`.
  uint32_t slice_entries() const { return slice_entries_; }
  uint64_t slice_offset(uint64_t l2_offset, uint64_t l2_index) const {
    return l2_offset + (l2_index - l2_index % slice_entries_) * (extended_l2_ ? 16 : 8);
  }
  L2Cache& l2_cache() { return cache_; }
  uint64_t l1_size() const { return l1_size_; }

 private:
  uint32_t cluster_bits_;
  uint32_t l2_bits_;  // log2(entries per L2 table)
  bool extended_l2_;
  uint32_t version_;
  bool has_data_file_;
  uint64_t l1_size_;
  std::vector<uint64_t> l1_;
  L2Cache cache_;
  uint32_t slice_entries_;  // L2 entries per cache slice
  uint32_t csize_shift_;
  uint64_t csize_mask_;
  uint64_t cluster_offset_mask_;
};

}  // namespace strata::block::qcow2
