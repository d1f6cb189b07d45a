#include "block/drivers/qcow2/cluster_map.h"

#include <algorithm>
#include <bit>
#include <cinttypes>
#include <cstdio>
#include <string>

#include "block/drivers/qcow2/format.h"

namespace strata::block::qcow2 {

namespace {

enum class ClusterType { kCompressed, kZeroPlain, kZeroAlloc, kNormal, kUnallocated };

std::string hex(uint64_t value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%#" PRIx64, value);
  return buffer;
}

// QEMU's qcow2_signal_corruption on a read: the request fails with EIO. The message is the
// description QEMU prints ("qcow2: Image is corrupt: ...").
Error corruption(const std::string& what) {
  return Error(ErrorKind::kCorrupt, "qcow2: Image is corrupt: " + what, EIO);
}

// Subclusters [0, n) as a mask of the low 32 bits.
uint32_t low_bits(uint32_t n) {
  return n >= 32 ? 0xffffffffu : ((uint32_t{1} << n) - 1);
}

}  // namespace

ClusterMap::ClusterMap(const Header& header, std::vector<uint64_t> l1, bool has_data_file,
                       uint64_t cache_slices, uint32_t cache_slice_bytes)
    : cluster_bits_(header.cluster_bits),
      l2_bits_(header.l2_bits()),
      extended_l2_(header.extended_l2()),
      version_(header.version),
      has_data_file_(has_data_file),
      l1_size_(header.l1_size),
      l1_(std::move(l1)),
      cache_(cache_slices, cache_slice_bytes),
      slice_entries_(cache_slice_bytes / header.l2_entry_size()),
      csize_shift_(62 - (header.cluster_bits - 8)),
      csize_mask_((uint64_t{1} << (header.cluster_bits - 8)) - 1),
      cluster_offset_mask_((uint64_t{1} << (62 - (header.cluster_bits - 8))) - 1) {}

aio::Task<Result<Mapping>> ClusterMap::map(Node& file, uint64_t offset, uint64_t bytes) {
  const uint64_t cluster_size = uint64_t{1} << cluster_bits_;
  const uint32_t subclusters = extended_l2_ ? kSubclustersPerCluster : 1;
  const uint32_t subcluster_bits = cluster_bits_ - (extended_l2_ ? 5 : 0);
  const uint64_t offset_in_cluster = offset & (cluster_size - 1);
  const uint64_t l2_index_in_table = (offset >> cluster_bits_) & ((uint64_t{1} << l2_bits_) - 1);
  const uint32_t slice_index = static_cast<uint32_t>(l2_index_in_table % slice_entries_);

  // Bytes from the start of this cluster to the end of its L2 slice.
  uint64_t bytes_needed = bytes + offset_in_cluster;
  const uint64_t bytes_available = uint64_t{slice_entries_ - slice_index} << cluster_bits_;
  bytes_needed = std::min(bytes_needed, bytes_available);

  Mapping m;
  auto finish = [&](uint64_t available) {
    m.bytes = std::min(available, bytes_needed) - offset_in_cluster;
    return m;
  };

  const uint64_t l1_index = offset >> (cluster_bits_ + l2_bits_);
  const uint64_t l1_entry = l1_index < l1_.size() ? l1_[l1_index] : 0;
  const uint64_t l2_offset = l1_entry & kL1OffsetMask;
  if (l1_index >= l1_size_ || l2_offset == 0) {
    m.type = SubclusterType::kUnallocatedPlain;
    co_return finish(bytes_available);
  }
  if ((l2_offset & (cluster_size - 1)) != 0) {
    co_return corruption("L2 table offset " + hex(l2_offset) +
                         " unaligned (L1 index: " + hex(l1_index) + ")");
  }

  const uint64_t entry_size = extended_l2_ ? 16 : 8;
  const uint64_t slice_offset = l2_offset + (l2_index_in_table - slice_index) * entry_size;
  Result<L2Slice> loaded = co_await cache_.get(file, slice_offset);
  if (!loaded) {
    co_return std::move(loaded).error();
  }
  const std::vector<uint64_t>& slice = **loaded;
  auto entry_at = [&](uint32_t i) { return slice[i * (extended_l2_ ? 2 : 1)]; };
  auto bitmap_at = [&](uint32_t i) { return extended_l2_ ? slice[i * 2 + 1] : uint64_t{0}; };

  auto cluster_type = [&](uint64_t l2_entry) {
    if (l2_entry & kOflagCompressed) {
      return ClusterType::kCompressed;
    }
    if ((l2_entry & kOflagZero) && !extended_l2_) {
      return (l2_entry & kL2OffsetMask) != 0 ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
    }
    if ((l2_entry & kL2OffsetMask) == 0) {
      // Offset 0 is a valid cluster in an external data file, told apart by COPIED.
      return has_data_file_ && (l2_entry & kOflagCopied) ? ClusterType::kNormal
                                                         : ClusterType::kUnallocated;
    }
    return ClusterType::kNormal;
  };
  // QEMU's qcow2_get_subcluster_type; nullopt for an invalid bitmap.
  auto subcluster_type = [&](uint64_t l2_entry, uint64_t bitmap,
                             uint32_t sc) -> std::optional<SubclusterType> {
    ClusterType type = cluster_type(l2_entry);
    if (!extended_l2_) {
      switch (type) {
        case ClusterType::kCompressed:
          return SubclusterType::kCompressed;
        case ClusterType::kZeroPlain:
          return SubclusterType::kZeroPlain;
        case ClusterType::kZeroAlloc:
          return SubclusterType::kZeroAlloc;
        case ClusterType::kNormal:
          return SubclusterType::kNormal;
        case ClusterType::kUnallocated:
          return SubclusterType::kUnallocatedPlain;
      }
      return std::nullopt;
    }
    switch (type) {
      case ClusterType::kCompressed:
        return SubclusterType::kCompressed;
      case ClusterType::kNormal:
        if ((bitmap >> 32) & bitmap) {
          return std::nullopt;
        }
        if (bitmap & (uint64_t{1} << (32 + sc))) {
          return SubclusterType::kZeroAlloc;
        }
        if (bitmap & (uint64_t{1} << sc)) {
          return SubclusterType::kNormal;
        }
        return SubclusterType::kUnallocatedAlloc;
      case ClusterType::kUnallocated:
        if (bitmap & kBitmapAllAlloc) {
          return std::nullopt;
        }
        if (bitmap & (uint64_t{1} << (32 + sc))) {
          return SubclusterType::kZeroPlain;
        }
        return SubclusterType::kUnallocatedPlain;
      default:
        return std::nullopt;  // zero clusters do not exist with extended L2
    }
  };
  // QEMU's qcow2_get_subcluster_range_type: how many subclusters from `sc_from` share the type.
  auto range_count = [&](uint64_t l2_entry, uint64_t bitmap, uint32_t sc_from,
                         SubclusterType& type) -> std::optional<uint32_t> {
    auto t = subcluster_type(l2_entry, bitmap, sc_from);
    if (!t) {
      return std::nullopt;
    }
    type = *t;
    if (!extended_l2_ || type == SubclusterType::kCompressed) {
      return subclusters - sc_from;
    }
    const uint32_t alloc = static_cast<uint32_t>(bitmap);
    const uint32_t zero = static_cast<uint32_t>(bitmap >> 32);
    switch (type) {
      case SubclusterType::kNormal:
        return static_cast<uint32_t>(std::countr_one(alloc | low_bits(sc_from))) - sc_from;
      case SubclusterType::kZeroPlain:
      case SubclusterType::kZeroAlloc:
        return static_cast<uint32_t>(std::countr_one(zero | low_bits(sc_from))) - sc_from;
      default:
        return static_cast<uint32_t>(std::countr_zero((zero | alloc) & ~low_bits(sc_from))) -
               sc_from;
    }
  };

  const uint64_t l2_entry = entry_at(slice_index);
  const uint64_t bitmap = bitmap_at(slice_index);
  const uint32_t sc_index = static_cast<uint32_t>(offset_in_cluster >> subcluster_bits);
  auto first_type = subcluster_type(l2_entry, bitmap, sc_index);
  const std::string where =
      " (L2 offset: " + hex(l2_offset) + ", L2 index: " + hex(l2_index_in_table) + ")";
  if (first_type && version_ < 3 &&
      (*first_type == SubclusterType::kZeroPlain || *first_type == SubclusterType::kZeroAlloc)) {
    co_return corruption("Zero cluster entry found in pre-v3 image" + where);
  }
  if (first_type) {
    m.type = *first_type;
    switch (*first_type) {
      case SubclusterType::kCompressed: {
        if (has_data_file_) {
          co_return corruption("Compressed cluster entry found in image with external data file" +
                               where);
        }
        const uint64_t descriptor = l2_entry & kL2CompressedOffsetSizeMask;
        m.compressed_offset = descriptor & cluster_offset_mask_;
        const uint64_t sectors = ((descriptor >> csize_shift_) & csize_mask_) + 1;
        m.compressed_size = sectors * 512 - (m.compressed_offset & 511);
        break;
      }
      case SubclusterType::kNormal:
      case SubclusterType::kZeroAlloc:
      case SubclusterType::kUnallocatedAlloc: {
        const uint64_t host_cluster = l2_entry & kL2OffsetMask;
        if ((host_cluster & (cluster_size - 1)) != 0) {
          co_return corruption("Cluster allocation offset " + hex(host_cluster) + " unaligned" +
                               where);
        }
        m.host_offset = host_cluster + offset_in_cluster;
        break;
      }
      default:
        break;
    }
  }

  // QEMU's count_contiguous_subclusters over the clusters this request touches.
  const uint64_t clusters_needed = (bytes_needed + cluster_size - 1) >> cluster_bits_;
  uint64_t count = 0;
  bool check_offset = false;
  uint64_t expected_offset = 0;
  SubclusterType expected_type = SubclusterType::kNormal;
  for (uint64_t i = 0; i < clusters_needed; ++i) {
    const uint32_t index = slice_index + static_cast<uint32_t>(i);
    const uint32_t first_sc = i == 0 ? sc_index : 0;
    const uint64_t entry = entry_at(index);
    SubclusterType type = SubclusterType::kNormal;
    auto n = range_count(entry, bitmap_at(index), first_sc, type);
    if (!n) {
      co_return corruption("Invalid cluster entry found  (L2 offset: " + hex(l2_offset) +
                           ", L2 index: " + hex(l2_index_in_table + i) + ")");
    }
    if (i == 0) {
      if (type == SubclusterType::kCompressed) {
        count = *n;
        break;
      }
      expected_type = type;
      expected_offset = entry & kL2OffsetMask;
      check_offset = type == SubclusterType::kNormal || type == SubclusterType::kZeroAlloc ||
                     type == SubclusterType::kUnallocatedAlloc;
    } else if (type != expected_type) {
      break;
    } else if (check_offset) {
      expected_offset += cluster_size;
      if (expected_offset != (entry & kL2OffsetMask)) {
        break;
      }
    }
    count += *n;
    if (first_sc + *n < subclusters) {
      break;
    }
  }
  co_return finish((count + sc_index) << subcluster_bits);
}

}  // namespace strata::block::qcow2
