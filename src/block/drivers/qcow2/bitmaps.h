#pragma once
// qcow2 persistent dirty bitmaps (qcow2.rst "Bitmaps extension", "Bitmap directory", "Bitmap
// table"; QEMU's block/qcow2-bitmap.c): the on-disk directory format and its constraints, as pure
// functions over bytes. Loading and storing through a node is Qcow2Node's (bitmaps.cc).
//
// Life cycle on disk, as QEMU's:
// - open read-write: every consistent bitmap is marked IN_USE in the directory (rewritten in
//   place with the autoclear bit cleared meanwhile), so a crash leaves them visibly stale;
// - close / inactivate: each changed bitmap gets new data clusters and a new table, then a new
//   directory is written and flushed, the header switches to it (autoclear bit set) and is
//   flushed, and only then are the old directory and tables freed: a crash at any point leaves
//   the old or the new state plus leaked clusters.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace strata::block::qcow2 {

inline constexpr uint32_t kBitmapFlagInUse = 1u << 0;
inline constexpr uint32_t kBitmapFlagAuto = 1u << 1;
inline constexpr uint32_t kBitmapReservedFlags = 0xfffffffcu;
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;
inline constexpr uint64_t kBitmapTableEntryOffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapTableEntryReservedMask = 0xff000000000001feull;
inline constexpr uint64_t kBitmapTableEntryAllOnes = 1;
// QEMU's BME_* limits and QCOW2_MAX_BITMAPS / QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
inline constexpr uint64_t kMaxBitmapTableSize = 0x8000000;
inline constexpr uint64_t kMaxBitmapPhysSize = 0x20000000;
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr uint32_t kMaxBitmapNameSize = 1023;
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectorySize = uint64_t{1024} * kMaxBitmaps;

// One bitmap directory entry (without extra data: QEMU refuses entries that have any).
struct BitmapDirectoryEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries of the bitmap table
  uint32_t flags = 0;
  uint8_t granularity_bits = 0;
  std::string name;
};

// Bytes an entry with a `name_size`-byte name takes in the directory (8-byte aligned).
uint64_t bitmap_directory_entry_size(uint64_t name_size);

// QEMU's bitmap_list_load after reading `directory`: every entry checked (QEMU's check_dir_entry
// against `image_length`, the node's length), with QEMU's messages ("Broken bitmap directory",
// "Bitmap 'x' doesn't satisfy the constraints", "More/Less bitmaps found than specified in
// header extension", "Bitmap extra data is not supported").
Result<std::vector<BitmapDirectoryEntry>> parse_bitmap_directory(std::span<const uint8_t> directory,
                                                                 uint32_t nb_bitmaps,
                                                                 uint64_t cluster_size,
                                                                 uint64_t image_length);

// QEMU's check_dir_entry for an entry about to be stored.
bool bitmap_directory_entry_valid(const BitmapDirectoryEntry& entry, uint64_t cluster_size,
                                  uint64_t image_length);

// The directory bytes for `entries` (QEMU's bitmap_list_store before the write).
std::vector<uint8_t> serialize_bitmap_directory(const std::vector<BitmapDirectoryEntry>& entries);

// QEMU's check_table_entry: reserved bits clear; an entry with an offset is cluster aligned and
// has no all-ones flag.
bool bitmap_table_entry_valid(uint64_t entry, uint64_t cluster_size);

// QEMU's check_constraints_on_bitmap, with its messages.
Result<void> check_bitmap_constraints(const std::string& name, uint64_t granularity,
                                      uint64_t image_length, uint64_t cluster_size);

}  // namespace strata::block::qcow2
