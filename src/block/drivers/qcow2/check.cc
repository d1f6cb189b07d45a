#include "block/drivers/qcow2/check.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <limits>
#include <map>
#include <optional>
#include <span>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/header.h"
#include "block/drivers/qcow2/metadata_io.h"

namespace strata::block::qcow2 {

namespace {

// Reserved bits and masks of qcow2.rst (QEMU's L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK,
// REFT_*, BME_TABLE_ENTRY_*).
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;
constexpr uint64_t kReftableOffsetMask = 0xfffffffffffffe00ull;
constexpr uint64_t kReftableReservedMask = 0x1ffull;
constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kBitmapEntryReservedMask = 0xff000000000001feull;
constexpr uint64_t kBitmapEntryAllOnes = 1;

std::string text(const char* fmt, auto... args) {
  char buffer[512];
  std::snprintf(buffer, sizeof(buffer), fmt, args...);
  return buffer;
}

enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

aio::Task<Result<std::vector<uint8_t>>> read_bytes(Node& file, uint64_t offset, uint64_t bytes) {
  std::vector<uint8_t> buffer(bytes);
  if (bytes > 0) {
    Result<void> read = co_await read_zero_padded(file, offset, IoVector(buffer.data(), bytes));
    if (!read) {
      co_return std::move(read).error();
    }
  }
  co_return buffer;
}

uint64_t load_refcount(const uint8_t* block, uint64_t index, uint32_t order) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    const uint32_t per_byte = 8 / bits;
    const uint32_t shift = static_cast<uint32_t>(index % per_byte) * bits;
    return (block[index / per_byte] >> shift) & ((1u << bits) - 1);
  }
  const uint32_t bytes = bits / 8;
  const uint8_t* p = block + index * bytes;
  uint64_t value = 0;
  for (uint32_t i = 0; i < bytes; ++i) {
    value = (value << 8) | p[i];
  }
  return value;
}

struct Snapshot {
  std::string id;
  std::string name;
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
};

struct Bitmap {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;
};

class Checker {
 public:
  Checker(Node& file, const Header& header, bool has_data_file)
      : file_(file),
        header_(header),
        cluster_size_(header.cluster_size()),
        has_data_file_(has_data_file),
        refcount_order_(header.refcount_order),
        refcount_max_(header.refcount_order == 6
                          ? std::numeric_limits<uint64_t>::max()
                          : (uint64_t{1} << (1u << header.refcount_order)) - 1),
        refblock_bits_(header.cluster_bits + 3 - header.refcount_order),
        l2_entries_(uint64_t{1} << header.l2_bits()),
        file_length_(file.length()) {
    csize_shift_ = 62 - (header.cluster_bits - 8);
    csize_mask_ = (uint64_t{1} << (header.cluster_bits - 8)) - 1;
    cluster_offset_mask_ = (uint64_t{1} << csize_shift_) - 1;
    imrt_.resize((file_length_ + cluster_size_ - 1) / cluster_size_, 0);
  }

  CheckResult& result() { return result_; }

  void report(std::string message) { result_.messages.push_back(std::move(message)); }

  ClusterType cluster_type(uint64_t entry) const {
    if ((entry & kOflagCompressed) != 0) {
      return ClusterType::kCompressed;
    }
    if ((entry & kOflagZero) != 0 && !header_.extended_l2()) {
      return (entry & kL2OffsetMask) != 0 ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
    }
    if ((entry & kL2OffsetMask) == 0) {
      // Offset 0 is a valid cluster of an external data file when COPIED says refcount 1.
      return has_data_file_ && (entry & kOflagCopied) != 0 ? ClusterType::kNormal
                                                           : ClusterType::kUnallocated;
    }
    return ClusterType::kNormal;
  }

  // QEMU's qcow2_inc_refcounts_imrt.
  void inc_refcounts(uint64_t offset, uint64_t size) {
    if (size == 0) {
      return;
    }
    // The last cluster may be partly past the end of the file, but not by a whole cluster.
    if (static_cast<int64_t>(offset + size - file_length_) >= static_cast<int64_t>(cluster_size_)) {
      report(
          text("ERROR: counting reference for region exceeding the end of the file by one "
               "cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64,
               offset, size));
      result_.corruptions++;
      return;
    }
    const uint64_t first = offset / cluster_size_;
    const uint64_t last = (offset + size - 1) / cluster_size_;
    for (uint64_t k = first; k <= last; ++k) {
      if (k >= imrt_.size()) {
        imrt_.resize(k + 1, 0);
      }
      if (imrt_[k] == refcount_max_) {
        report(text("ERROR: overflow cluster offset=0x%" PRIx64, k * cluster_size_));
        report(
            "Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
            "create a clean copy if the image cannot be opened for writing");
        result_.corruptions++;
        continue;
      }
      imrt_[k]++;
    }
  }

  // QEMU's check_refcounts_l2.
  // An L2 table at or past the end of the file reads as zeroes: nothing to count, and no await
  // (a long run of synchronously completing awaits would grow the stack in unoptimised builds).
  aio::Task<Result<void>> check_l2(uint64_t l2_offset, bool frag_info) {
    if (l2_offset >= file_length_) {
      co_return ok();
    }
    auto table = co_await read_bytes(file_, l2_offset, cluster_size_);
    if (!table) {
      report("ERROR: I/O error in check_refcounts_l2");
      result_.check_errors++;
      co_return std::move(table).error();
    }
    scan_l2(*table, frag_info);
    co_return ok();
  }

  void scan_l2(const std::vector<uint8_t>& table, bool frag_info) {
    const uint32_t entry_size = header_.l2_entry_size();
    uint64_t next_contiguous = 0;
    for (uint64_t i = 0; i < l2_entries_; ++i) {
      const uint8_t* p = table.data() + i * entry_size;
      uint64_t entry = load_be64(p);
      const uint64_t bitmap = header_.extended_l2() ? load_be64(p + 8) : 0;
      const ClusterType type = cluster_type(entry);
      if (type != ClusterType::kCompressed && (entry & kL2StdReservedMask) != 0) {
        report(text("ERROR found l2 entry with reserved bits set: %" PRIx64, entry));
        result_.corruptions++;
      }
      switch (type) {
        case ClusterType::kCompressed: {
          if ((entry & kOflagCopied) != 0) {
            report(text("ERROR: coffset=0x%" PRIx64
                        ": copied flag must never be set for compressed clusters",
                        entry & cluster_offset_mask_));
            entry &= ~kOflagCopied;
            result_.corruptions++;
          }
          if (has_data_file_) {
            report(text("ERROR compressed cluster %d with data file, entry=0x%" PRIx64,
                        static_cast<int>(i), entry));
            result_.corruptions++;
            break;
          }
          if (bitmap != 0) {
            report(
                text("ERROR compressed cluster %d with non-zero subcluster allocation "
                     "bitmap, entry=0x%" PRIx64,
                     static_cast<int>(i), entry));
            result_.corruptions++;
            break;
          }
          const uint64_t coffset = entry & cluster_offset_mask_;
          const uint64_t sectors = ((entry >> csize_shift_) & csize_mask_) + 1;
          const uint64_t csize = sectors * 512 - (coffset & 511);
          inc_refcounts(coffset, csize);
          if (frag_info) {
            result_.allocated_clusters++;
            result_.compressed_clusters++;
            result_.fragmented_clusters++;
          }
          break;
        }
        case ClusterType::kZeroAlloc:
        case ClusterType::kNormal: {
          const uint64_t offset = entry & kL2OffsetMask;
          if (((bitmap >> 32) & bitmap) != 0) {
            result_.corruptions++;
            report(text("ERROR offset=%" PRIx64
                        ": Allocated cluster has corrupted subcluster allocation bitmap",
                        offset));
          }
          if (offset % cluster_size_ != 0) {
            result_.corruptions++;
            const bool contains_data =
                header_.extended_l2() ? (bitmap & kBitmapAllAlloc) != 0 : (entry & kOflagZero) == 0;
            report(text(contains_data ? "ERROR offset=%" PRIx64
                                        ": Data cluster is not properly aligned; L2 entry "
                                        "corrupted."
                                      : "ERROR offset=%" PRIx64
                                        ": Preallocated cluster is not properly aligned; L2 "
                                        "entry corrupted.",
                        offset));
          }
          if (frag_info) {
            result_.allocated_clusters++;
            if (next_contiguous != 0 && offset != next_contiguous) {
              result_.fragmented_clusters++;
            }
            next_contiguous = offset + cluster_size_;
          }
          if (!has_data_file_) {
            inc_refcounts(offset, cluster_size_);
          }
          break;
        }
        case ClusterType::kZeroPlain:
          break;
        case ClusterType::kUnallocated:
          if ((bitmap & kBitmapAllAlloc) != 0) {
            result_.corruptions++;
            report("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap");
          }
          break;
      }
    }
  }

  // QEMU's check_refcounts_l1.
  aio::Task<Result<void>> check_l1(uint64_t l1_offset, uint64_t l1_size, bool frag_info) {
    inc_refcounts(l1_offset, l1_size * 8);
    if (l1_size == 0) {
      co_return ok();
    }
    auto table = co_await read_bytes(file_, l1_offset, l1_size * 8);
    if (!table) {
      report("ERROR: I/O error in check_refcounts_l1");
      result_.check_errors++;
      co_return std::move(table).error();
    }
    for (uint64_t i = 0; i < l1_size; ++i) {
      const uint64_t entry = load_be64(table->data() + i * 8);
      if (entry == 0) {
        continue;
      }
      if ((entry & kL1ReservedMask) != 0) {
        report(text("ERROR found L1 entry with reserved bits set: %" PRIx64, entry));
        result_.corruptions++;
      }
      const uint64_t l2_offset = entry & kL1OffsetMask;
      if (l2_offset == 0) {
        continue;
      }
      inc_refcounts(l2_offset, cluster_size_);
      if (l2_offset % cluster_size_ != 0) {
        report(text("ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted",
                    l2_offset));
        result_.corruptions++;
      }
      if (l2_offset < file_length_) {
        Result<void> l2 = co_await check_l2(l2_offset, frag_info);
        if (!l2) {
          co_return l2;
        }
      }
    }
    co_return ok();
  }

  // Reads every refcount block the refcount table points at (QEMU reads them through its cache
  // during the check). Blocks at or past the end of the file read as zeroes and are stored empty,
  // so a corrupt table costs no memory; unaligned pointers are left out.
  aio::Task<Result<void>> load_refblocks() {
    for (const uint64_t entry : reftable_) {
      const uint64_t block_offset = entry & kReftableOffsetMask;
      if (block_offset == 0 || block_offset % cluster_size_ != 0 ||
          refblocks_.count(block_offset) != 0) {
        continue;
      }
      if (block_offset >= file_length_) {
        refblocks_.emplace(block_offset, std::vector<uint8_t>());
        continue;
      }
      auto block = co_await read_bytes(file_, block_offset, cluster_size_);
      if (!block) {
        co_return std::move(block).error();
      }
      refblocks_.emplace(block_offset, std::move(block).value());
    }
    co_return ok();
  }

  // The refcount of `cluster` on disk (QEMU's qcow2_get_refcount); nullopt when its refcount
  // block pointer is unaligned (QEMU fails that lookup with EIO).
  std::optional<uint64_t> disk_refcount(uint64_t cluster) const {
    const uint64_t index = cluster >> refblock_bits_;
    if (index >= reftable_.size()) {
      return 0;
    }
    const uint64_t block_offset = reftable_[index] & kReftableOffsetMask;
    if (block_offset == 0) {
      return 0;
    }
    if (block_offset % cluster_size_ != 0) {
      return std::nullopt;
    }
    auto block = refblocks_.find(block_offset);
    if (block == refblocks_.end() || block->second.empty()) {
      return 0;
    }
    const uint64_t within = cluster & ((uint64_t{1} << refblock_bits_) - 1);
    return load_refcount(block->second.data(), within, refcount_order_);
  }

  // QEMU's check_refblocks (without repair).
  void check_refblocks() {
    const uint64_t nb_clusters = (file_length_ + cluster_size_ - 1) / cluster_size_;
    for (uint64_t i = 0; i < reftable_.size(); ++i) {
      const uint64_t entry = reftable_[i];
      const uint64_t offset = entry & kReftableOffsetMask;
      const uint64_t cluster = offset / cluster_size_;
      if ((entry & kReftableReservedMask) != 0) {
        report(text("ERROR refcount table entry %" PRId64 " has reserved bits set",
                    static_cast<int64_t>(i)));
        result_.corruptions++;
        continue;
      }
      if (offset % cluster_size_ != 0) {
        report(text("ERROR refcount block %" PRId64
                    " is not cluster aligned; refcount table entry corrupted",
                    static_cast<int64_t>(i)));
        result_.corruptions++;
        continue;
      }
      if (cluster >= nb_clusters) {
        report(text("ERROR refcount block %" PRId64 " is outside image", static_cast<int64_t>(i)));
        result_.corruptions++;
        continue;
      }
      if (offset != 0) {
        inc_refcounts(offset, cluster_size_);
        if (imrt_[cluster] != 1) {
          report(text("ERROR refcount block %" PRId64 " refcount=%" PRIu64, static_cast<int64_t>(i),
                      imrt_[cluster]));
          result_.corruptions++;
        }
      }
    }
  }

  // QEMU's compare_refcounts (without repair); returns the highest cluster in use.
  uint64_t compare_refcounts() {
    uint64_t highest = 0;
    for (uint64_t i = 0; i < imrt_.size(); ++i) {
      const std::optional<uint64_t> on_disk = disk_refcount(i);
      if (!on_disk) {
        report(text("Can't get refcount for cluster %" PRId64 ": Input/output error",
                    static_cast<int64_t>(i)));
        result_.check_errors++;
        continue;
      }
      const uint64_t refcount = *on_disk;
      const uint64_t references = imrt_[i];
      if (refcount > 0 || references > 0) {
        highest = i;
      }
      if (refcount != references) {
        report(text("%s cluster %" PRId64 " refcount=%" PRIu64 " reference=%" PRIu64,
                    refcount < references ? "ERROR" : "Leaked", static_cast<int64_t>(i), refcount,
                    references));
        if (refcount < references) {
          result_.corruptions++;
        } else {
          result_.leaks++;
        }
      }
    }
    return highest;
  }

  // QEMU's check_oflag_copied (without repair), over the active L1 table.
  aio::Task<Result<void>> check_oflag_copied(const std::vector<uint64_t>& l1) {
    for (size_t i = 0; i < l1.size(); ++i) {
      const uint64_t l1_entry = l1[i];
      const uint64_t l2_offset = l1_entry & kL1OffsetMask;
      if (l2_offset == 0) {
        continue;
      }
      const std::optional<uint64_t> refcount = disk_refcount(l2_offset / cluster_size_);
      if (!refcount) {
        continue;
      }
      if ((*refcount == 1) != ((l1_entry & kOflagCopied) != 0)) {
        result_.corruptions++;
        report(text("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%" PRIx64
                    " refcount=%" PRIu64,
                    static_cast<int>(i), l1_entry, *refcount));
      }
      if (l2_offset >= file_length_) {
        continue;  // reads as zeroes: no allocated entries
      }
      auto table = co_await read_bytes(file_, l2_offset, cluster_size_);
      if (!table) {
        report("ERROR: Could not read L2 table: Input/output error");
        result_.check_errors++;
        co_return std::move(table).error();
      }
      const uint32_t entry_size = header_.l2_entry_size();
      for (uint64_t j = 0; j < l2_entries_; ++j) {
        const uint64_t entry = load_be64(table->data() + j * entry_size);
        const ClusterType type = cluster_type(entry);
        if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) {
          continue;
        }
        uint64_t data_refcount = 1;
        if (!has_data_file_) {
          const std::optional<uint64_t> found =
              disk_refcount((entry & kL2OffsetMask) / cluster_size_);
          if (!found) {
            continue;
          }
          data_refcount = *found;
        }
        if ((data_refcount == 1) != ((entry & kOflagCopied) != 0)) {
          result_.corruptions++;
          report(text("ERROR OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
                      entry, data_refcount));
        }
      }
    }
    co_return ok();
  }

  // QEMU's qcow2_check_bitmaps_refcounts.
  aio::Task<Result<void>> check_bitmaps(uint64_t directory_offset, uint64_t directory_size,
                                        uint32_t count) {
    if (count == 0) {
      co_return ok();
    }
    inc_refcounts(directory_offset, directory_size);
    auto directory = co_await read_bytes(file_, directory_offset, directory_size);
    if (!directory) {
      co_return std::move(directory).error();
    }
    std::vector<Bitmap> bitmaps;
    uint64_t at = 0;
    for (uint32_t i = 0; i < count; ++i) {
      if (at + 24 > directory->size()) {
        report("ERROR: Bitmap directory is corrupt");
        result_.corruptions++;
        co_return ok();
      }
      const uint8_t* p = directory->data() + at;
      Bitmap bitmap{load_be64(p), load_be32(p + 8)};
      const uint64_t name_size = load_be16(p + 18);
      const uint64_t extra = load_be32(p + 20);
      at += (24 + extra + name_size + 7) & ~uint64_t{7};
      bitmaps.push_back(bitmap);
    }
    for (const auto& bitmap : bitmaps) {
      inc_refcounts(bitmap.table_offset, uint64_t{bitmap.table_size} * 8);
      auto table = co_await read_bytes(file_, bitmap.table_offset, uint64_t{bitmap.table_size} * 8);
      if (!table) {
        result_.corruptions++;
        break;
      }
      for (uint32_t i = 0; i < bitmap.table_size; ++i) {
        const uint64_t entry = load_be64(table->data() + uint64_t{i} * 8);
        const uint64_t offset = entry & kBitmapEntryOffsetMask;
        if ((entry & kBitmapEntryReservedMask) != 0 ||
            (offset != 0 && ((entry & kBitmapEntryAllOnes) != 0 || offset % cluster_size_ != 0))) {
          result_.corruptions++;
          continue;
        }
        if (offset != 0) {
          inc_refcounts(offset, cluster_size_);
        }
      }
    }
    co_return ok();
  }

  std::vector<uint64_t> reftable_;

 private:
  Node& file_;
  const Header& header_;
  uint64_t cluster_size_;
  bool has_data_file_;
  uint32_t refcount_order_;
  uint64_t refcount_max_;
  uint32_t refblock_bits_;
  uint64_t l2_entries_;
  uint64_t file_length_;
  uint32_t csize_shift_ = 0;
  uint64_t csize_mask_ = 0;
  uint64_t cluster_offset_mask_ = 0;
  std::vector<uint64_t> imrt_;
  std::map<uint64_t, std::vector<uint8_t>> refblocks_;
  CheckResult result_;
};

std::vector<uint64_t> be64_table(const std::vector<uint8_t>& bytes) {
  std::vector<uint64_t> table(bytes.size() / 8);
  for (size_t i = 0; i < table.size(); ++i) {
    table[i] = load_be64(bytes.data() + i * 8);
  }
  return table;
}

}  // namespace

aio::Task<Result<CheckResult>> check_image(Node& file) {
  auto head = co_await read_bytes(file, 0, kHeaderStructSize);
  if (!head) {
    co_return std::move(head).error();
  }
  auto cluster_bits = probe_cluster_bits(*head);
  if (!cluster_bits) {
    co_return std::move(cluster_bits).error();
  }
  auto cluster = co_await read_bytes(file, 0, uint64_t{1} << *cluster_bits);
  if (!cluster) {
    co_return std::move(cluster).error();
  }
  auto parsed = parse_header(*cluster);
  if (!parsed) {
    co_return std::move(parsed).error();
  }
  const Header header = *parsed;
  const uint64_t cs = header.cluster_size();
  const bool has_data_file = (header.incompatible_features & kIncompatDataFile) != 0;

  // Bitmaps extension (only while the autoclear bit says it is valid).
  uint32_t nb_bitmaps = 0;
  uint64_t bitmap_directory_size = 0;
  uint64_t bitmap_directory_offset = 0;
  if ((header.autoclear_features & kAutoclearBitmaps) != 0 && header.version >= 3) {
    uint64_t at = header.header_length;
    const uint64_t end = std::min<uint64_t>(header.extensions_end(), cluster->size());
    while (at + 8 <= end) {
      const uint32_t magic = load_be32(cluster->data() + at);
      const uint32_t length = load_be32(cluster->data() + at + 4);
      if (magic == kExtEnd || at + 8 + length > end) {
        break;
      }
      if (magic == kExtBitmaps && length >= 24) {
        nb_bitmaps = load_be32(cluster->data() + at + 8);
        bitmap_directory_size = load_be64(cluster->data() + at + 16);
        bitmap_directory_offset = load_be64(cluster->data() + at + 24);
      }
      at += 8 + ((uint64_t{length} + 7) & ~uint64_t{7});
    }
  }

  Checker checker(file, header, has_data_file);
  CheckResult& result = checker.result();
  // Guest clusters (QEMU: size_to_clusters of total_sectors * 512).
  const uint64_t guest_bytes = (header.size + 511) & ~uint64_t{511};
  result.total_clusters = (guest_bytes + cs - 1) / cs;

  auto reftable = co_await read_bytes(file, header.refcount_table_offset,
                                      uint64_t{header.refcount_table_clusters} * cs);
  if (!reftable) {
    co_return std::move(reftable).error();
  }
  checker.reftable_ = be64_table(*reftable);
  auto l1_bytes = co_await read_bytes(file, header.l1_table_offset, uint64_t{header.l1_size} * 8);
  if (!l1_bytes) {
    co_return std::move(l1_bytes).error();
  }
  const std::vector<uint64_t> l1 = be64_table(*l1_bytes);

  // Snapshot table (QEMU's qcow2_read_snapshots): the L1 tables and the table's own size.
  std::vector<Snapshot> snapshots;
  uint64_t offset = header.snapshots_offset;
  for (uint32_t i = 0; i < header.nb_snapshots; ++i) {
    offset = (offset + 7) & ~uint64_t{7};
    auto entry = co_await read_bytes(file, offset, kSnapshotHeaderSize);
    if (!entry) {
      co_return std::move(entry).error().with_prefix("Failed to read snapshot table");
    }
    Snapshot snapshot;
    snapshot.l1_table_offset = load_be64(entry->data());
    snapshot.l1_size = load_be32(entry->data() + 8);
    const uint16_t id_size = load_be16(entry->data() + 12);
    const uint16_t name_size = load_be16(entry->data() + 14);
    const uint32_t extra = load_be32(entry->data() + 36);
    if (extra > kMaxSnapshotExtraData) {
      co_return Error(ErrorKind::kInvalidArgument,
                      "Too much extra metadata in snapshot table entry " + std::to_string(i),
                      EFBIG);
    }
    auto names = co_await read_bytes(file, offset + kSnapshotHeaderSize + extra,
                                     uint64_t{id_size} + name_size);
    if (!names) {
      co_return std::move(names).error().with_prefix("Failed to read snapshot table");
    }
    snapshot.id.assign(reinterpret_cast<const char*>(names->data()), id_size);
    snapshot.name.assign(reinterpret_cast<const char*>(names->data()) + id_size, name_size);
    offset += kSnapshotHeaderSize + extra + id_size + name_size;
    if (offset - header.snapshots_offset > kMaxSnapshotsTableBytes) {
      co_return Error(ErrorKind::kInvalidArgument, "Snapshot table is too big", EFBIG);
    }
    snapshots.push_back(std::move(snapshot));
  }
  const uint64_t snapshots_size = header.nb_snapshots > 0 ? offset - header.snapshots_offset : 0;

  // calculate_refcounts: header, active L1, snapshots, snapshot table, refcount table, bitmaps,
  // refcount blocks.
  checker.inc_refcounts(0, cs);
  Result<void> step = co_await checker.check_l1(header.l1_table_offset, header.l1_size, true);
  if (!step) {
    co_return std::move(step).error();
  }
  if (has_data_file && header.nb_snapshots > 0) {
    checker.report(
        text("ERROR %d snapshots in image with data file", static_cast<int>(header.nb_snapshots)));
    result.corruptions++;
  }
  for (const auto& snapshot : snapshots) {
    if (snapshot.l1_size > kMaxL1Bytes / 8) {
      checker.report(text("ERROR snapshot %s (%s) l1_size=%#" PRIx32
                          ": L1 size is too large; snapshot table entry corrupted",
                          snapshot.id.c_str(), snapshot.name.c_str(), snapshot.l1_size));
      result.corruptions++;
      continue;
    }
    step = co_await checker.check_l1(snapshot.l1_table_offset, snapshot.l1_size, false);
    if (!step) {
      co_return std::move(step).error();
    }
  }
  checker.inc_refcounts(header.snapshots_offset, snapshots_size);
  checker.inc_refcounts(header.refcount_table_offset, checker.reftable_.size() * 8);
  step = co_await checker.check_bitmaps(bitmap_directory_offset, bitmap_directory_size, nb_bitmaps);
  if (!step) {
    co_return std::move(step).error();
  }
  checker.check_refblocks();

  step = co_await checker.load_refblocks();
  if (!step) {
    co_return std::move(step).error();
  }
  const uint64_t highest = checker.compare_refcounts();
  step = co_await checker.check_oflag_copied(l1);
  if (!step) {
    co_return std::move(step).error();
  }
  result.image_end_offset = (highest + 1) * cs;
  co_return std::move(result);
}

}  // namespace strata::block::qcow2
