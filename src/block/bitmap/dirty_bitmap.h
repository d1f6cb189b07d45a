#pragma once
// Dirty bitmaps (QEMU's BdrvDirtyBitmap over an HBitmap): one bit per `granularity` bytes of a
// node's guest range, set by every write, write-zeroes and discard that reaches the node while the
// bitmap is enabled. A node holds its bitmaps in a BitmapSet (Node::dirty_bitmaps()); the request
// layer calls BitmapSet::mark_dirty after each such request, the format driver loads and stores
// the persistent ones (qcow2: bitmaps.cc), and users (`strata img bitmap`, later the QMP
// block-dirty-bitmap-* commands and backup jobs) query and change them.
//
// Serialised form (qcow2.rst "Bitmaps extension", "Bitmap table"): bit i stands for the guest bytes
// [i * granularity, (i + 1) * granularity); byte i / 8 holds it at bit i % 8 (least significant
// first), which is QEMU's hbitmap_serialize_part on little-endian words.
//
// Threading: a bitmap belongs to its node and is used on the node's home loop only.

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace strata::block::bitmap {

// QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
inline constexpr size_t kMaxNameLength = 1023;

class DirtyBitmap {
 public:
  // `granularity` is a power of two of at least 512 (callers check it with QEMU's messages);
  // `size` is the node's length in bytes.
  DirtyBitmap(std::string name, uint64_t size, uint32_t granularity);

  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  uint32_t granularity() const { return granularity_; }
  uint64_t bit_count() const { return bit_count_; }

  // Enabled bitmaps record writes; disabled ones keep their bits.
  bool enabled() const { return enabled_; }
  void set_enabled(bool enabled) { enabled_ = enabled; }
  // Stored in the image when it is closed (qcow2 persistent bitmaps).
  bool persistent() const { return persistent_; }
  void set_persistent(bool persistent) { persistent_ = persistent; }
  // Loaded from an image that marked it in use: its bits are unusable (QEMU refuses every use but
  // removal), and it stops recording (QEMU's bdrv_dirty_bitmap_set_inconsistent).
  bool inconsistent() const { return inconsistent_; }
  void set_inconsistent() {
    inconsistent_ = true;
    enabled_ = false;
  }
  // Loaded from a read-only image: may not be modified, and is not stored back.
  bool readonly() const { return readonly_; }
  void set_readonly(bool readonly) { readonly_ = readonly; }
  // In use by an operation that owns it for a while (an NBD export, later a backup job): QMP
  // may neither change nor remove it (QEMU's bdrv_dirty_bitmap_busy).
  bool busy() const { return busy_; }
  void set_busy(bool busy) { busy_ = busy; }

  // Marks or clears the chunks overlapping [offset, offset + bytes) (clamped to size()).
  void set(uint64_t offset, uint64_t bytes);
  void reset(uint64_t offset, uint64_t bytes);
  void clear();
  // Whether the chunk holding `offset` is dirty (false past size()).
  bool test(uint64_t offset) const;
  // Dirty bytes: dirty chunks times granularity (QEMU's bdrv_get_dirty_count).
  uint64_t count() const;
  // The start of the first dirty (clean) chunk at or after `offset`, as a byte offset not below
  // `offset`, or nullopt when there is none before size().
  std::optional<uint64_t> next_dirty(uint64_t offset) const;
  std::optional<uint64_t> next_zero(uint64_t offset) const;
  // Sets every chunk of this bitmap that overlaps a dirty chunk of `source` (granularities may
  // differ; the sizes must be equal: the caller checks).
  void merge_from(const DirtyBitmap& source);

  // Bytes of the serialised bit array for chunks covering [offset, offset + bytes) (offset is a
  // multiple of the granularity).
  uint64_t serialization_size(uint64_t offset, uint64_t bytes) const;
  // Guest bytes one serialised buffer of `buffer_bytes` covers (QEMU's
  // bdrv_dirty_bitmap_serialization_coverage).
  uint64_t serialization_coverage(uint64_t buffer_bytes) const {
    return buffer_bytes * 8 * granularity_;
  }
  // Writes the bits of [offset, offset + bytes) to `out` (serialization_size bytes), or reads them
  // from `in`, replacing what was there. `offset` must be a multiple of serialization_coverage of
  // some whole number of bytes (callers use cluster boundaries).
  void serialize_part(std::span<uint8_t> out, uint64_t offset, uint64_t bytes) const;
  void deserialize_part(std::span<const uint8_t> in, uint64_t offset, uint64_t bytes);

  // The bit array as QEMU's HBitmap keeps its last level: little-endian 64-bit words, at least
  // one (x-debug-block-dirty-bitmap-sha256 hashes exactly these bytes).
  std::vector<uint8_t> hbitmap_bytes() const;
  // A copy of the bits, and putting such a copy back (transaction undo of clear and merge).
  std::vector<uint64_t> save_bits() const { return words_; }
  void restore_bits(std::vector<uint64_t> words) { words_ = std::move(words); }

 private:
  uint64_t first_chunk(uint64_t offset) const { return offset / granularity_; }
  // One past the last chunk overlapping [offset, offset + bytes), clamped to bit_count_.
  uint64_t end_chunk(uint64_t offset, uint64_t bytes) const;
  void set_bits(uint64_t first, uint64_t end, bool value);
  bool bit(uint64_t index) const { return (words_[index / 64] >> (index % 64)) & 1; }
  std::optional<uint64_t> find_bit(uint64_t from, bool value) const;

  std::string name_;
  uint64_t size_;
  uint32_t granularity_;
  uint64_t bit_count_;
  std::vector<uint64_t> words_;
  bool enabled_ = true;
  bool persistent_ = false;
  bool inconsistent_ = false;
  bool readonly_ = false;
  bool busy_ = false;
};

// What a user of a bitmap requires of it (QEMU's BDRV_BITMAP_* flags of bdrv_dirty_bitmap_check).
enum BitmapCheck : unsigned {
  kCheckBusy = 1u << 0,
  kCheckReadonly = 1u << 1,
  kCheckInconsistent = 1u << 2,
  // Modifying the bits: BDRV_BITMAP_DEFAULT.
  kCheckDefault = kCheckBusy | kCheckReadonly | kCheckInconsistent,
  // Reading the bits or switching recording on and off: BDRV_BITMAP_ALLOW_RO.
  kCheckAllowReadonly = kCheckBusy | kCheckInconsistent,
};

// QEMU's bdrv_dirty_bitmap_check, with its messages ("Bitmap 'x' is currently in use by another
// operation and cannot be used", "... is readonly and cannot be modified", "... is inconsistent
// and cannot be used").
Result<void> check_bitmap(const DirtyBitmap& bitmap, unsigned checks);

// The named bitmaps of one node, in creation order (QEMU lists them newest first in query-block;
// the qcow2 directory keeps the image's order). Bitmaps are shared: a user that must outlive a
// removal (an NBD export reading a busy bitmap while its node is inactivated) keeps a reference.
class BitmapSet {
 public:
  DirtyBitmap* find(std::string_view name) const;
  std::shared_ptr<DirtyBitmap> find_shared(std::string_view name) const;
  // Adds a bitmap; the caller checked that the name is free.
  DirtyBitmap& add(std::unique_ptr<DirtyBitmap> bitmap);
  // Removes and destroys the bitmap called `name` (no-op when there is none).
  void remove(std::string_view name);
  const std::vector<std::shared_ptr<DirtyBitmap>>& bitmaps() const { return bitmaps_; }
  bool empty() const { return bitmaps_.empty(); }

  // The request layer's hook: every enabled bitmap records [offset, offset + bytes).
  void mark_dirty(uint64_t offset, uint64_t bytes);

 private:
  std::vector<std::shared_ptr<DirtyBitmap>> bitmaps_;
};

// QEMU's checks for a new bitmap's name and granularity (block_dirty_bitmap_add and
// bdrv_create_dirty_bitmap), with their messages, in QEMU's order: empty name, granularity,
// name in use, name too long.
Result<void> check_new_bitmap(const BitmapSet& set, std::string_view name, uint64_t granularity);

}  // namespace strata::block::bitmap
