#include "block/drivers/qcow2/check.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>

#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/header.h"
#include "block/drivers/qcow2/metadata_io.h"
#include "block/drivers/qcow2/refcount.h"
#include "block/drivers/qcow2/repair.h"
#include "block/io/request.h"

namespace strata::block::qcow2 {

namespace {

// Reserved bits and masks of qcow2.rst (QEMU's L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK,
// REFT_*, BME_TABLE_ENTRY_*).
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;
constexpr uint64_t kReftableReservedMask = 0x1ffull;
constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kBitmapEntryReservedMask = 0xff000000000001feull;
constexpr uint64_t kBitmapEntryAllOnes = 1;

std::string text(const char* fmt, auto... args) {
  char buffer[512];
  std::snprintf(buffer, sizeof(buffer), fmt, args...);
  return buffer;
}

// QEMU's fix modes print "Repairing" where the read-only check prints "ERROR".
const char* repairing_or_error(bool repairing) {
  return repairing ? "Repairing" : "ERROR";
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
  Checker(Node& file, Header& header, bool has_data_file, uint32_t fix)
      : file_(file),
        header_(header),
        fix_(fix),
        writable_(fix != 0),
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
  // Replaces the counters (not the messages) with `counters`' (QEMU assigns whole results).
  void set_counters(const CheckResult& counters) {
    std::vector<std::string> messages = std::move(result_.messages);
    result_ = counters;
    result_.messages = std::move(messages);
  }
  bool rebuild() const { return rebuild_; }
  void set_fix(uint32_t fix) { fix_ = fix; }
  void set_rebuild(bool rebuild) { rebuild_ = rebuild; }
  std::vector<uint64_t>& imrt() { return imrt_; }
  uint64_t file_length() const { return file_length_; }
  void refresh_file_length() { file_length_ = file_.length(); }
  // Forgets the counted references (for a second counting pass over a repaired image).
  void reset_imrt() { imrt_.assign((file_length_ + cluster_size_ - 1) / cluster_size_, 0); }

  void report(std::string message) { deliver(std::move(message), false); }
  // A message QEMU prints with error_report (the program name in front).
  void report_error(std::string message) { deliver(std::move(message), true); }
  void deliver(std::string message, bool program_prefixed) {
    if (sink_) {
      sink_(message, program_prefixed);
    } else {
      result_.messages.push_back(std::move(message));
    }
  }
  void set_sink(CheckMessageSink sink) { sink_ = std::move(sink); }

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
    const std::vector<uint64_t> to_zero = scan_l2(*table, frag_info);
    for (const uint64_t index : to_zero) {
      Result<void> fixed = co_await fix_l2_entry_by_zero(l2_offset, index);
      if (!fixed) {
        // QEMU keeps checking the table and counts the cluster as used.
        report(std::string("ERROR: Failed to overwrite L2 table entry: ") +
               std::strerror(fixed.error().errno_value()));
        result_.check_errors++;
        inc_refcounts(load_be64(table->data() + index * header_.l2_entry_size()) & kL2OffsetMask,
                      cluster_size_);
        continue;
      }
      result_.corruptions--;
      result_.corruptions_fixed++;
    }
    co_return ok();
  }

  // QEMU's fix_l2_entry_by_zero: the entry becomes a plain zero cluster (with extended L2: no
  // host offset, allocated subclusters read as zeroes), written and flushed.
  aio::Task<Result<void>> fix_l2_entry_by_zero(uint64_t l2_offset, uint64_t index) {
    const uint32_t entry_size = header_.l2_entry_size();
    uint8_t raw[16] = {};
    if (header_.extended_l2()) {
      auto old = co_await read_bytes(file_, l2_offset + index * entry_size, entry_size);
      if (!old) {
        co_return std::move(old).error();
      }
      uint64_t bitmap = load_be64(old->data() + 8);
      bitmap |= bitmap << 32;
      bitmap &= ~kBitmapAllAlloc;
      put_be64(raw + 8, bitmap);
    } else {
      put_be64(raw, kOflagZero);
    }
    Result<void> written =
        co_await io::pwrite(file_, l2_offset + index * entry_size, raw, entry_size);
    if (!written) {
      co_return written;
    }
    co_return co_await io::flush(file_);
  }

  // Counts the references of one L2 table; returns the entries that must become zero clusters
  // (preallocated and unaligned, when repairing errors), whose references are not counted.
  std::vector<uint64_t> scan_l2(const std::vector<uint8_t>& table, bool frag_info) {
    std::vector<uint64_t> to_zero;
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
            if (contains_data) {
              report(text("ERROR offset=%" PRIx64
                          ": Data cluster is not properly aligned; L2 entry corrupted.",
                          offset));
            } else {
              report(text("%s offset=%" PRIx64
                          ": Preallocated cluster is not properly aligned; L2 entry corrupted.",
                          (fix_ & kFixErrors) != 0 ? "Repairing" : "ERROR", offset));
              if ((fix_ & kFixErrors) != 0) {
                to_zero.push_back(i);
                continue;
              }
            }
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
    return to_zero;
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
      const uint64_t block_offset = entry & kRefcountTableOffsetMask;
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
  // block pointer is unaligned: QEMU fails that lookup with EIO after signalling the corruption,
  // which, when the image is open for repair, marks it corrupt and stops every later write
  // (mark_corrupt_if_signalled() does that part).
  std::optional<uint64_t> disk_refcount(uint64_t cluster) {
    const uint64_t index = cluster >> refblock_bits_;
    if (index >= reftable_.size()) {
      return 0;
    }
    const uint64_t block_offset = reftable_[index] & kRefcountTableOffsetMask;
    if (block_offset == 0) {
      return 0;
    }
    if (block_offset % cluster_size_ != 0) {
      signal_corruption(text("Refblock offset %#" PRIx64 " unaligned (reftable index: %#" PRIx64
                             ")",
                             block_offset, index));
      return std::nullopt;
    }
    auto block = refblocks_.find(block_offset);
    if (block == refblocks_.end() || block->second.empty()) {
      return 0;
    }
    const uint64_t within = cluster & ((uint64_t{1} << refblock_bits_) - 1);
    return load_refcount(block->second.data(), within, refcount_order_);
  }

  // QEMU's qcow2_signal_corruption as the check meets it: once, fatal when the image is open for
  // repair (QEMU then drops the driver, so every later write of the repair fails with EIO).
  void signal_corruption(const std::string& message) {
    if (corruption_signalled_) {
      return;
    }
    corruption_signalled_ = true;
    if (writable_) {
      report("qcow2: Marking image as corrupt: " + message +
             "; further corruption events will be suppressed");
      writes_failed_ = true;
    } else {
      report("qcow2: Image is corrupt: " + message +
             "; further non-fatal corruption events will be suppressed");
    }
  }

  // Sets the corrupt bit on disk after a fatal signal_corruption().
  aio::Task<Result<void>> mark_corrupt_if_signalled() {
    if (!writes_failed_ || corrupt_marked_) {
      co_return ok();
    }
    corrupt_marked_ = true;
    if (header_.version < 3) {
      co_return ok();  // a version 2 header has no feature bits to store it in
    }
    const uint64_t features = header_.incompatible_features | kIncompatCorrupt;
    Result<void> written = co_await write_incompatible_features(file_, features);
    if (written) {
      header_.incompatible_features = features;
    }
    co_return written;
  }
  // After a fatal corruption QEMU's writes fail: so do the repair's.
  bool writes_failed() const { return writes_failed_; }

  // QEMU's check_refblocks: counts each refcount block's own cluster. With kFixErrors a block
  // past the end of the file is repaired by growing the file to hold it; entries that cannot be
  // trusted (reserved bits, unaligned, not exactly one reference) ask for a rebuild.
  aio::Task<Result<void>> check_refblocks() {
    uint64_t nb_clusters = (file_length_ + cluster_size_ - 1) / cluster_size_;
    for (uint64_t i = 0; i < reftable_.size(); ++i) {
      const uint64_t entry = reftable_[i];
      const uint64_t offset = entry & kRefcountTableOffsetMask;
      const uint64_t cluster = offset / cluster_size_;
      if ((entry & kReftableReservedMask) != 0) {
        report(text("ERROR refcount table entry %" PRId64 " has reserved bits set",
                    static_cast<int64_t>(i)));
        result_.corruptions++;
        rebuild_ = true;
        continue;
      }
      if (offset % cluster_size_ != 0) {
        report(text("ERROR refcount block %" PRId64
                    " is not cluster aligned; refcount table entry corrupted",
                    static_cast<int64_t>(i)));
        result_.corruptions++;
        rebuild_ = true;
        continue;
      }
      if (cluster >= nb_clusters) {
        result_.corruptions++;
        report(text("%s refcount block %" PRId64 " is outside image",
                    repairing_or_error((fix_ & kFixErrors) != 0), static_cast<int64_t>(i)));
        if ((fix_ & kFixErrors) == 0) {
          continue;
        }
        Result<void> grown = Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
        if (offset <= static_cast<uint64_t>(INT64_MAX) - cluster_size_) {
          grown = co_await io::truncate(file_, offset + cluster_size_, false);
        }
        if (grown) {
          refresh_file_length();
          nb_clusters = (file_length_ + cluster_size_ - 1) / cluster_size_;
          if (imrt_.size() < nb_clusters) {
            imrt_.resize(nb_clusters, 0);
          }
          if (cluster >= nb_clusters) {
            grown = Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
          }
        }
        if (!grown) {
          rebuild_ = true;
          report(std::string("ERROR could not resize image: ") +
                 std::strerror(grown.error().errno_value()));
          continue;
        }
        result_.corruptions--;
        result_.corruptions_fixed++;
        // The grown area reads as zeroes: the block now holds exactly this one reference.
        inc_refcounts(offset, cluster_size_);
        continue;
      }
      if (offset != 0) {
        inc_refcounts(offset, cluster_size_);
        if (imrt_[cluster] != 1) {
          report(text("ERROR refcount block %" PRId64 " refcount=%" PRIu64, static_cast<int64_t>(i),
                      imrt_[cluster]));
          result_.corruptions++;
          rebuild_ = true;
        }
      }
    }
    co_return ok();
  }

  // QEMU's compare_refcounts; returns the highest cluster in use. A cluster whose refcount is 0
  // but has references asks for a rebuild (its refcount block may not exist); other mismatches
  // are patched in the cached refcount blocks when `fix` allows (write_dirty_refblocks() stores
  // them).
  uint64_t compare_refcounts(uint32_t fix) {
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
      if (refcount == references) {
        continue;
      }
      uint64_t* num_fixed = nullptr;
      if (refcount == 0) {
        rebuild_ = true;
      } else if (refcount > references && (fix & kFixLeaks) != 0) {
        num_fixed = &result_.leaks_fixed;
      } else if (refcount < references && (fix & kFixErrors) != 0) {
        num_fixed = &result_.corruptions_fixed;
      }
      report(text("%s cluster %" PRId64 " refcount=%" PRIu64 " reference=%" PRIu64,
                  num_fixed != nullptr    ? "Repairing"
                  : refcount < references ? "ERROR"
                                          : "Leaked",
                  static_cast<int64_t>(i), refcount, references));
      if (num_fixed != nullptr && set_disk_refcount(i, references)) {
        (*num_fixed)++;
        if (references == 0) {
          freed_clusters_.push_back(i);
        }
        continue;
      }
      if (refcount < references) {
        result_.corruptions++;
      } else {
        result_.leaks++;
      }
    }
    return highest;
  }

  // Sets the refcount of `cluster` in its cached refcount block (which must exist: its refcount
  // is not 0) and remembers the block for write_dirty_refblocks().
  bool set_disk_refcount(uint64_t cluster, uint64_t value) {
    const uint64_t index = cluster >> refblock_bits_;
    if (index >= reftable_.size()) {
      return false;
    }
    const uint64_t block_offset = reftable_[index] & kRefcountTableOffsetMask;
    auto block = refblocks_.find(block_offset);
    if (block_offset == 0 || block == refblocks_.end() || block->second.empty()) {
      return false;
    }
    const uint64_t within = cluster & ((uint64_t{1} << refblock_bits_) - 1);
    set_refcount_entry(block->second.data(), refcount_order_, within, value);
    dirty_refblocks_.insert(block_offset);
    return true;
  }

  // Writes the refcount blocks compare_refcounts() changed, then flushes.
  aio::Task<Result<void>> write_dirty_refblocks() {
    for (const uint64_t block_offset : dirty_refblocks_) {
      std::vector<uint8_t>& block = refblocks_[block_offset];
      Result<void> written = co_await io::pwrite(file_, block_offset, block.data(), block.size());
      if (!written) {
        co_return written;
      }
    }
    dirty_refblocks_.clear();
    Result<void> flushed = co_await io::flush(file_);
    if (!flushed) {
      co_return flushed;
    }
    // QEMU frees repaired leaks with QCOW2_DISCARD_ALWAYS. Advisory: a failure changes nothing.
    for (const uint64_t cluster : freed_clusters_) {
      ignore_error(co_await io::pdiscard(file_, cluster * cluster_size_, cluster_size_),
                   "discard of a freed cluster is advisory");
    }
    freed_clusters_.clear();
    co_return ok();
  }

  // Switches to a rebuilt refcount structure: later lookups read the new blocks.
  aio::Task<Result<void>> use_refcount_table(std::vector<uint64_t> table) {
    reftable_ = std::move(table);
    refblocks_.clear();
    refresh_file_length();
    co_return co_await load_refblocks();
  }

  // QEMU's check_oflag_copied over the active L1 table `l1` (updated when entries are repaired):
  // OFLAG_COPIED must be set exactly where the refcount is 1. Repairs always with kFixErrors,
  // with kFixLeaks only when the refcounts were found (or made) consistent.
  aio::Task<Result<void>> check_oflag_copied(std::vector<uint64_t>& l1, uint32_t fix) {
    bool repair = false;
    if ((fix & kFixErrors) != 0) {
      repair = true;
    } else if ((fix & kFixLeaks) != 0) {
      repair = result_.check_errors == 0 && result_.corruptions == 0 && result_.leaks == 0;
    }
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
        report(text("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%" PRIx64
                    " refcount=%" PRIu64,
                    repairing_or_error(repair), static_cast<int>(i), l1_entry, *refcount));
        if (repair) {
          const uint64_t fixed =
              *refcount == 1 ? (l1_entry | kOflagCopied) : (l1_entry & ~kOflagCopied);
          uint8_t raw[8];
          put_be64(raw, fixed);
          Result<void> written =
              co_await io::pwrite(file_, header_.l1_table_offset + i * 8, raw, sizeof(raw));
          if (!written) {
            result_.check_errors++;
            co_return written;
          }
          l1[i] = fixed;
          result_.corruptions--;
          result_.corruptions_fixed++;
        }
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
      uint64_t l2_dirty = 0;
      for (uint64_t j = 0; j < l2_entries_; ++j) {
        uint8_t* p = table->data() + j * entry_size;
        const uint64_t entry = load_be64(p);
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
          report(text("%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
                      repairing_or_error(repair), entry, data_refcount));
          if (repair) {
            put_be64(p, data_refcount == 1 ? (entry | kOflagCopied) : (entry & ~kOflagCopied));
            l2_dirty++;
          }
        }
      }
      if (l2_dirty > 0) {
        Result<void> written = co_await io::pwrite(file_, l2_offset, table->data(), table->size());
        if (!written) {
          report(std::string("ERROR: Could not write L2 table: ") +
                 std::strerror(written.error().errno_value()));
          result_.check_errors++;
          co_return written;
        }
        result_.corruptions -= l2_dirty;
        result_.corruptions_fixed += l2_dirty;
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
  Header& header_;
  uint32_t fix_;
  bool writable_;  // opened for repair: corruption signals are fatal
  bool corruption_signalled_ = false;
  bool writes_failed_ = false;
  bool corrupt_marked_ = false;
  CheckMessageSink sink_;
  bool rebuild_ = false;
  std::set<uint64_t> dirty_refblocks_;
  std::vector<uint64_t> freed_clusters_;  // leaks repaired to refcount 0, to be discarded
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

aio::Task<Result<CheckResult>> check_image(Node& file, uint32_t fix, CheckMessageSink sink) {
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
  Header header = *parsed;
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

  Checker checker(file, header, has_data_file, fix);
  checker.set_sink(std::move(sink));
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
  std::vector<uint64_t> l1 = be64_table(*l1_bytes);

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

  // QEMU's calculate_refcounts: header, active L1, snapshots, snapshot table, refcount table,
  // bitmaps, refcount blocks.
  auto calculate = [&]() -> aio::Task<Result<void>> {
    checker.inc_refcounts(0, cs);
    Result<void> step = co_await checker.check_l1(header.l1_table_offset, header.l1_size, true);
    if (!step) {
      co_return step;
    }
    if (has_data_file && header.nb_snapshots > 0) {
      checker.report(text("ERROR %d snapshots in image with data file",
                          static_cast<int>(header.nb_snapshots)));
      result.corruptions++;
    }
    for (const auto& snapshot : snapshots) {
      if (snapshot.l1_table_offset % cs != 0) {
        checker.report(text("ERROR snapshot %s (%s) l1_offset=%#" PRIx64
                            ": L1 table is not cluster aligned; snapshot table entry corrupted",
                            snapshot.id.c_str(), snapshot.name.c_str(), snapshot.l1_table_offset));
        result.corruptions++;
        continue;
      }
      if (snapshot.l1_size > kMaxL1Bytes / 8) {
        checker.report(text("ERROR snapshot %s (%s) l1_size=%#" PRIx32
                            ": L1 table is too large; snapshot table entry corrupted",
                            snapshot.id.c_str(), snapshot.name.c_str(), snapshot.l1_size));
        result.corruptions++;
        continue;
      }
      step = co_await checker.check_l1(snapshot.l1_table_offset, snapshot.l1_size, false);
      if (!step) {
        co_return step;
      }
    }
    checker.inc_refcounts(header.snapshots_offset, snapshots_size);
    checker.inc_refcounts(header.refcount_table_offset, checker.reftable_.size() * 8);
    step =
        co_await checker.check_bitmaps(bitmap_directory_offset, bitmap_directory_size, nb_bitmaps);
    if (!step) {
      co_return step;
    }
    co_return co_await checker.check_refblocks();
  };

  // QEMU's qcow2_check_refcounts.
  Result<void> step = co_await calculate();
  if (!step) {
    co_return std::move(step).error();
  }
  step = co_await checker.load_refblocks();
  if (!step) {
    co_return std::move(step).error();
  }
  // With a fix but no rebuild, the comparison is run again with the fix and this one ignored.
  const CheckResult pre_compare = result;
  uint64_t highest = checker.compare_refcounts(0);
  step = co_await checker.mark_corrupt_if_signalled();
  if (!step) {
    co_return std::move(step).error();
  }
  if (checker.rebuild() && (fix & kFixErrors) != 0) {
    const CheckResult old_result = result;
    uint64_t fresh_leaks = 0;
    checker.report("Rebuilding refcount structure");
    Result<RebuiltRefcounts> rebuilt =
        Error(ErrorKind::kIo, "ERROR writing refblock: Input/output error", EIO);
    if (!checker.writes_failed()) {
      rebuilt = co_await rebuild_refcount_structure(file, header, checker.imrt());
    }
    if (!rebuilt) {
      result.check_errors++;
      checker.report_error(rebuilt.error().message());
      co_return std::move(rebuilt).error();
    }
    header.refcount_table_offset = rebuilt->table_offset;
    header.refcount_table_clusters = rebuilt->table_clusters;
    step = co_await checker.use_refcount_table(std::move(rebuilt->table));
    if (!step) {
      co_return std::move(step).error();
    }
    result.corruptions = 0;
    result.leaks = 0;
    // The old structure is now leaked: count the references again against the new one.
    checker.set_rebuild(false);
    checker.set_fix(0);
    checker.reset_imrt();
    step = co_await calculate();
    if (!step) {
      co_return std::move(step).error();
    }
    if ((fix & kFixLeaks) != 0) {
      const CheckResult saved = result;
      checker.set_counters(CheckResult{});
      highest = checker.compare_refcounts(kFixLeaks);
      if (checker.rebuild()) {
        checker.report("ERROR rebuilt refcount structure is still broken");
      }
      // Leaks left now were introduced by the rebuild itself.
      fresh_leaks = result.leaks;
      checker.set_counters(saved);
    }
    if (result.corruptions < old_result.corruptions) {
      result.corruptions_fixed += old_result.corruptions - result.corruptions;
    }
    if (result.leaks < old_result.leaks) {
      result.leaks_fixed += old_result.leaks - result.leaks;
    }
    result.leaks += fresh_leaks;
  } else if (fix != 0) {
    if (checker.rebuild()) {
      checker.report("ERROR need to rebuild refcount structures");
      result.check_errors++;
      co_return Error(ErrorKind::kIo, "Input/output error", EIO);
    }
    if (result.leaks != 0 || result.corruptions != 0) {
      checker.set_counters(pre_compare);
      highest = checker.compare_refcounts(fix);
    }
  }
  step = co_await checker.write_dirty_refblocks();
  if (!step) {
    result.check_errors++;
    co_return std::move(step).error();
  }
  step = co_await checker.check_oflag_copied(l1, fix);
  if (!step) {
    co_return std::move(step).error();
  }
  result.image_end_offset = (highest + 1) * cs;
  if (fix != 0 && result.check_errors == 0 && result.corruptions == 0) {
    step = co_await mark_clean_and_consistent(file, header);
    if (!step) {
      co_return std::move(step).error();
    }
  }
  co_return std::move(result);
}

}  // namespace strata::block::qcow2
