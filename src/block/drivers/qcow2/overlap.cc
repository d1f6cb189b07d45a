// Metadata overlap checks and the corrupt bit (QEMU's qcow2_check_metadata_overlap,
// qcow2_pre_write_overlap_check, qcow2_signal_corruption and qcow2_mark_corrupt).

#include "block/drivers/qcow2/overlap.h"

#include <array>
#include <bit>
#include <cstdio>
#include <string_view>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/qcow2/repair.h"
#include "block/graph/graph.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

struct Structure {
  std::string_view flag;  // the per-structure option
  const char* name;       // QEMU's metadata_ol_names
};

// Indexed by bit number.
constexpr std::array<Structure, 9> kStructures = {{
    {"main-header", "qcow2_header"},
    {"active-l1", "active L1 table"},
    {"active-l2", "active L2 table"},
    {"refcount-table", "refcount table"},
    {"refcount-block", "refcount block"},
    {"snapshot-table", "snapshot table"},
    {"inactive-l1", "inactive L1 table"},
    {"inactive-l2", "inactive L2 table"},
    {"bitmap-directory", "bitmap directory"},
}};

bool ranges_overlap(uint64_t a, uint64_t a_size, uint64_t b, uint64_t b_size) {
  return a_size != 0 && b_size != 0 && a < b + b_size && b < a + a_size;
}

}  // namespace

uint32_t overlap_checks(const std::optional<std::string>& template_name,
                        const std::map<std::string, bool>& flags) {
  uint32_t checks = kOverlapCached;
  if (template_name) {
    if (*template_name == "none") {
      checks = 0;
    } else if (*template_name == "constant") {
      checks = kOverlapConstant;
    } else if (*template_name == "all") {
      checks = kOverlapAll;
    }
  }
  for (size_t bit = 0; bit < kStructures.size(); ++bit) {
    auto flag = flags.find(std::string(kStructures[bit].flag));
    if (flag != flags.end()) {
      checks = flag->second ? (checks | (1u << bit)) : (checks & ~(1u << bit));
    }
  }
  return checks;
}

const char* overlap_structure_name(uint32_t bits) {
  const int bit = std::countr_zero(bits);
  return bit < static_cast<int>(kStructures.size()) ? kStructures[bit].name : "metadata";
}

uint32_t Qcow2Node::metadata_overlap(uint32_t ignore, uint64_t offset, uint64_t size) const {
  const uint32_t checks = overlap_checks_ & ~ignore;
  if (size == 0) {
    return 0;
  }
  if ((checks & kOverlapMainHeader) != 0 && offset < header_.cluster_size()) {
    return kOverlapMainHeader;
  }
  // Compare whole clusters.
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t start = offset & ~(cluster_size - 1);
  const uint64_t end = (offset + size + cluster_size - 1) & ~(cluster_size - 1);
  const uint64_t length = end - start;
  if ((checks & kOverlapActiveL1) != 0 &&
      ranges_overlap(start, length, header_.l1_table_offset, uint64_t{header_.l1_size} * 8)) {
    return kOverlapActiveL1;
  }
  if ((checks & kOverlapRefcountTable) != 0 && refcounts_ != nullptr &&
      ranges_overlap(start, length, header_.refcount_table_offset,
                     refcounts_->table_entries() * 8)) {
    return kOverlapRefcountTable;
  }
  if ((checks & kOverlapSnapshotTable) != 0 &&
      ranges_overlap(start, length, header_.snapshots_offset, snapshots_.size)) {
    return kOverlapSnapshotTable;
  }
  if ((checks & kOverlapInactiveL1) != 0) {
    for (const SnapshotEntry& snapshot : snapshots_.entries) {
      if (ranges_overlap(start, length, snapshot.l1_table_offset, uint64_t{snapshot.l1_size} * 8)) {
        return kOverlapInactiveL1;
      }
    }
  }
  if ((checks & kOverlapActiveL2) != 0 && map_ != nullptr) {
    for (uint64_t i = 0; i < map_->l1_size(); ++i) {
      const uint64_t l2_offset = map_->l1_entry(i) & kL1OffsetMask;
      if (l2_offset != 0 && ranges_overlap(start, length, l2_offset, cluster_size)) {
        return kOverlapActiveL2;
      }
    }
  }
  if ((checks & kOverlapRefcountBlock) != 0 && refcounts_ != nullptr) {
    for (uint64_t i = 0; i < refcounts_->used_entries(); ++i) {
      const uint64_t block_offset = refcounts_->table_entry(i) & kL1OffsetMask;
      if (block_offset != 0 && ranges_overlap(start, length, block_offset, cluster_size)) {
        return kOverlapRefcountBlock;
      }
    }
  }
  if ((checks & kOverlapBitmapDirectory) != 0 && header_contents_.nb_bitmaps > 0 &&
      ranges_overlap(start, length, header_contents_.bitmap_directory_offset,
                     header_contents_.bitmap_directory_size)) {
    return kOverlapBitmapDirectory;
  }
  return 0;
}

aio::Task<Result<uint32_t>> Qcow2Node::inactive_l2_overlap(uint64_t offset, uint64_t size) {
  const uint64_t cluster_size = header_.cluster_size();
  const uint64_t start = offset & ~(cluster_size - 1);
  const uint64_t end = (offset + size + cluster_size - 1) & ~(cluster_size - 1);
  // Copied: a snapshot operation may replace the table while this coroutine waits on a read.
  const std::vector<SnapshotEntry> snapshots = snapshots_.entries;
  for (const SnapshotEntry& snapshot : snapshots) {
    Result<void> valid = validate_table(snapshot.l1_table_offset, snapshot.l1_size, 8, kMaxL1Bytes,
                                        cluster_size, "Snapshot L1 table");
    if (!valid) {
      co_return valid.error();
    }
    std::vector<uint8_t> l1(uint64_t{snapshot.l1_size} * 8);
    Result<void> read =
        co_await read_zero_padded(file(), snapshot.l1_table_offset, IoVector(l1.data(), l1.size()));
    if (!read) {
      co_return read.error();
    }
    for (uint32_t i = 0; i < snapshot.l1_size; ++i) {
      const uint64_t l2_offset = load_be64(l1.data() + uint64_t{i} * 8) & kL1OffsetMask;
      if (l2_offset != 0 && ranges_overlap(start, end - start, l2_offset, cluster_size)) {
        co_return kOverlapInactiveL2;
      }
    }
  }
  co_return 0u;
}

aio::Task<Result<void>> Qcow2Node::pre_write_overlap_check(uint32_t ignore, uint64_t offset,
                                                           uint64_t size, bool data_file) {
  if (corrupted_) {
    co_return Error(ErrorKind::kIo, "qcow2: image is marked corrupt", ENOMEDIUM);
  }
  if (data_file && data_file_ != nullptr) {
    co_return ok();
  }
  uint32_t hit = metadata_overlap(ignore, offset, size);
  if (hit == 0 && (overlap_checks_ & ~ignore & kOverlapInactiveL2) != 0) {
    Result<uint32_t> inactive = co_await inactive_l2_overlap(offset, size);
    if (!inactive) {
      co_return inactive.error();
    }
    hit = *inactive;
  }
  if (hit == 0) {
    co_return ok();
  }
  co_await signal_corruption(true, static_cast<int64_t>(offset), static_cast<int64_t>(size),
                             std::string("Preventing invalid write on metadata (overlaps with ") +
                                 overlap_structure_name(hit) + ")");
  co_return Error(ErrorKind::kIo, "Input/output error", EIO);
}

aio::Task<void> Qcow2Node::signal_corruption(bool fatal, int64_t offset, int64_t size,
                                             std::string message) {
  fatal = fatal && is_writable();
  if (signaled_corruption_ && (!fatal || (header_.incompatible_features & kIncompatCorrupt) != 0)) {
    co_return;
  }
  if (fatal) {
    std::fprintf(stderr,
                 "qcow2: Marking image as corrupt: %s; further corruption events will be "
                 "suppressed\n",
                 message.c_str());
  } else {
    std::fprintf(stderr,
                 "qcow2: Image is corrupt: %s; further non-fatal corruption events will be "
                 "suppressed\n",
                 message.c_str());
  }
  if (graph() != nullptr) {
    // BLOCK_IMAGE_CORRUPTED: no BlockBackend names a storage daemon's node, so `device` is "".
    nlohmann::json data = {{"device", ""}};
    if (!name().empty()) {
      data["node-name"] = name();
    }
    data["msg"] = message;
    if (offset >= 0) {
      data["offset"] = offset;
    }
    if (size >= 0) {
      data["size"] = size;
    }
    data["fatal"] = fatal;
    graph()->emit_event("BLOCK_IMAGE_CORRUPTED", std::move(data));
  }
  if (fatal) {
    // QEMU's qcow2_mark_corrupt, then the node is unusable (QEMU drops its driver).
    corrupted_ = true;
    const uint64_t features = header_.incompatible_features | kIncompatCorrupt;
    // A version 2 header has no feature bits: the node is unusable all the same.
    Result<void> marked = ok();
    if (header_.version >= 3) {
      marked = co_await write_incompatible_features(file(), features);
    }
    if (marked) {
      header_.incompatible_features = features;
    } else {
      std::fprintf(stderr, "qcow2: could not mark the image corrupt: %s\n",
                   marked.error().message().c_str());
    }
  }
  signaled_corruption_ = true;
}

Result<void> Qcow2Node::check_usable() const {
  if (corrupted_) {
    return Error(ErrorKind::kIo, "No medium found", ENOMEDIUM);
  }
  return ok();
}

}  // namespace strata::block::qcow2
