// The bitmap directory format (bitmaps.h): parsing, checks and serialisation, pure functions.

#include <cstring>

#include "block/drivers/qcow2/bitmaps.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/refcount.h"

namespace strata::block::qcow2 {

namespace {

// Fixed part of a directory entry (qcow2.rst "Bitmap directory").
constexpr uint64_t kEntryHeaderSize = 24;

Error invalid(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

bool entry_valid(const BitmapDirectoryEntry& entry, uint8_t type, uint64_t cluster_size,
                 uint64_t image_length) {
  const bool fail = entry.table_size == 0 || entry.table_offset == 0 ||
                    entry.table_offset % cluster_size != 0 ||
                    entry.table_size > kMaxBitmapTableSize ||
                    entry.granularity_bits > kMaxBitmapGranularityBits ||
                    entry.granularity_bits < kMinBitmapGranularityBits ||
                    (entry.flags & kBitmapReservedFlags) != 0 ||
                    entry.name.size() > kMaxBitmapNameSize || type != kBitmapTypeDirtyTracking;
  if (fail) {
    return false;
  }
  const uint64_t phys_bytes = uint64_t{entry.table_size} * cluster_size;
  if (phys_bytes > kMaxBitmapPhysSize) {
    return false;
  }
  // A bitmap in use may have a stale size (an image resized without storing it); a valid one
  // must cover the whole image.
  return (entry.flags & kBitmapFlagInUse) != 0 ||
         image_length <= ((phys_bytes * 8) << entry.granularity_bits);
}

void store_be32(uint8_t* p, uint32_t value) {
  p[0] = static_cast<uint8_t>(value >> 24);
  p[1] = static_cast<uint8_t>(value >> 16);
  p[2] = static_cast<uint8_t>(value >> 8);
  p[3] = static_cast<uint8_t>(value);
}

}  // namespace

uint64_t bitmap_directory_entry_size(uint64_t name_size) {
  return (kEntryHeaderSize + name_size + 7) & ~uint64_t{7};
}

Result<std::vector<BitmapDirectoryEntry>> parse_bitmap_directory(std::span<const uint8_t> directory,
                                                                 uint32_t nb_bitmaps,
                                                                 uint64_t cluster_size,
                                                                 uint64_t image_length) {
  std::vector<BitmapDirectoryEntry> entries;
  const uint64_t size = directory.size();
  uint64_t at = 0;
  while (at < size) {
    if (at + kEntryHeaderSize > size) {
      return invalid("Broken bitmap directory");
    }
    if (entries.size() + 1 > nb_bitmaps) {
      return invalid("More bitmaps found than specified in header extension");
    }
    const uint8_t* p = directory.data() + at;
    BitmapDirectoryEntry entry;
    entry.table_offset = load_be64(p);
    entry.table_size = load_be32(p + 8);
    entry.flags = load_be32(p + 12);
    const uint8_t type = p[16];
    entry.granularity_bits = p[17];
    const uint16_t name_size = load_be16(p + 18);
    const uint32_t extra_data_size = load_be32(p + 20);
    const uint64_t entry_size =
        (kEntryHeaderSize + uint64_t{name_size} + extra_data_size + 7) & ~uint64_t{7};
    if (at + entry_size > size) {
      return invalid("Broken bitmap directory");
    }
    if (extra_data_size != 0) {
      return invalid("Bitmap extra data is not supported");
    }
    entry.name.assign(reinterpret_cast<const char*>(p + kEntryHeaderSize), name_size);
    if (!entry_valid(entry, type, cluster_size, image_length)) {
      return invalid("Bitmap '" + entry.name + "' doesn't satisfy the constraints");
    }
    entries.push_back(std::move(entry));
    at += entry_size;
  }
  if (entries.size() != nb_bitmaps) {
    return invalid("Less bitmaps found than specified in header extension");
  }
  return entries;
}

bool bitmap_directory_entry_valid(const BitmapDirectoryEntry& entry, uint64_t cluster_size,
                                  uint64_t image_length) {
  return entry_valid(entry, kBitmapTypeDirtyTracking, cluster_size, image_length);
}

std::vector<uint8_t> serialize_bitmap_directory(const std::vector<BitmapDirectoryEntry>& entries) {
  uint64_t size = 0;
  for (const auto& entry : entries) {
    size += bitmap_directory_entry_size(entry.name.size());
  }
  std::vector<uint8_t> directory(size, 0);
  uint64_t at = 0;
  for (const auto& entry : entries) {
    uint8_t* p = directory.data() + at;
    put_be64(p, entry.table_offset);
    store_be32(p + 8, entry.table_size);
    store_be32(p + 12, entry.flags);
    p[16] = kBitmapTypeDirtyTracking;
    p[17] = entry.granularity_bits;
    p[18] = static_cast<uint8_t>(entry.name.size() >> 8);
    p[19] = static_cast<uint8_t>(entry.name.size());
    std::memcpy(p + kEntryHeaderSize, entry.name.data(), entry.name.size());
    at += bitmap_directory_entry_size(entry.name.size());
  }
  return directory;
}

bool bitmap_table_entry_valid(uint64_t entry, uint64_t cluster_size) {
  if ((entry & kBitmapTableEntryReservedMask) != 0) {
    return false;
  }
  const uint64_t offset = entry & kBitmapTableEntryOffsetMask;
  return offset == 0 || ((entry & kBitmapTableEntryAllOnes) == 0 && offset % cluster_size == 0);
}

Result<void> check_bitmap_constraints(const std::string& name, uint64_t granularity,
                                      uint64_t image_length, uint64_t cluster_size) {
  uint32_t granularity_bits = 0;
  while ((uint64_t{1} << granularity_bits) < granularity) {
    ++granularity_bits;
  }
  if (granularity_bits > kMaxBitmapGranularityBits) {
    return invalid("Granularity exceeds maximum (" +
                   std::to_string(uint64_t{1} << kMaxBitmapGranularityBits) + " bytes)");
  }
  if (granularity_bits < kMinBitmapGranularityBits) {
    return invalid("Granularity is under minimum (" +
                   std::to_string(uint64_t{1} << kMinBitmapGranularityBits) + " bytes)");
  }
  const uint64_t bits = (image_length + granularity - 1) / granularity;
  const uint64_t bitmap_bytes = (bits + 7) / 8;
  if (bitmap_bytes > kMaxBitmapPhysSize || bitmap_bytes > kMaxBitmapTableSize * cluster_size) {
    return invalid("Too much space will be occupied by the bitmap. Use larger granularity");
  }
  if (name.size() > kMaxBitmapNameSize) {
    return invalid("Name length exceeds maximum (" + std::to_string(kMaxBitmapNameSize) +
                   " characters)");
  }
  return ok();
}

}  // namespace strata::block::qcow2
