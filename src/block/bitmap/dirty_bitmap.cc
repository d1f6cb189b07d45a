#include "block/bitmap/dirty_bitmap.h"

#include <algorithm>
#include <bit>
#include <cstring>

namespace strata::block::bitmap {

DirtyBitmap::DirtyBitmap(std::string name, uint64_t size, uint32_t granularity)
    : name_(std::move(name)),
      size_(size),
      granularity_(granularity),
      bit_count_((size + granularity - 1) / granularity),
      words_((bit_count_ + 63) / 64, 0) {}

uint64_t DirtyBitmap::end_chunk(uint64_t offset, uint64_t bytes) const {
  if (bytes == 0 || offset >= size_) {
    return first_chunk(std::min(offset, size_));
  }
  const uint64_t end = std::min(size_, offset + std::min(bytes, size_ - offset));
  return std::min(bit_count_, (end + granularity_ - 1) / granularity_);
}

void DirtyBitmap::set_bits(uint64_t first, uint64_t end, bool value) {
  for (uint64_t i = first; i < end;) {
    const uint64_t word = i / 64;
    const uint64_t low = i % 64;
    const uint64_t count = std::min<uint64_t>(64 - low, end - i);
    const uint64_t mask = (count == 64 ? ~uint64_t{0} : ((uint64_t{1} << count) - 1)) << low;
    words_[word] = value ? (words_[word] | mask) : (words_[word] & ~mask);
    i += count;
  }
}

void DirtyBitmap::set(uint64_t offset, uint64_t bytes) {
  if (offset < size_) {
    set_bits(first_chunk(offset), end_chunk(offset, bytes), true);
  }
}

void DirtyBitmap::reset(uint64_t offset, uint64_t bytes) {
  if (offset < size_) {
    set_bits(first_chunk(offset), end_chunk(offset, bytes), false);
  }
}

void DirtyBitmap::clear() {
  std::fill(words_.begin(), words_.end(), 0);
}

bool DirtyBitmap::test(uint64_t offset) const {
  return offset < size_ && bit(first_chunk(offset));
}

uint64_t DirtyBitmap::count() const {
  uint64_t bits = 0;
  for (uint64_t word : words_) {
    bits += static_cast<uint64_t>(std::popcount(word));
  }
  return bits * granularity_;
}

std::optional<uint64_t> DirtyBitmap::find_bit(uint64_t from, bool value) const {
  for (uint64_t i = from; i < bit_count_;) {
    const uint64_t word = value ? words_[i / 64] : ~words_[i / 64];
    const uint64_t masked = word & (~uint64_t{0} << (i % 64));
    if (masked != 0) {
      const uint64_t found = i / 64 * 64 + static_cast<uint64_t>(std::countr_zero(masked));
      if (found >= bit_count_) {
        return std::nullopt;
      }
      return found;
    }
    i = (i / 64 + 1) * 64;
  }
  return std::nullopt;
}

std::optional<uint64_t> DirtyBitmap::next_dirty(uint64_t offset) const {
  if (offset >= size_) {
    return std::nullopt;
  }
  auto found = find_bit(first_chunk(offset), true);
  if (!found) {
    return std::nullopt;
  }
  return std::max(offset, *found * granularity_);
}

std::optional<uint64_t> DirtyBitmap::next_zero(uint64_t offset) const {
  if (offset >= size_) {
    return std::nullopt;
  }
  auto found = find_bit(first_chunk(offset), false);
  if (!found) {
    return std::nullopt;
  }
  return std::max(offset, *found * granularity_);
}

void DirtyBitmap::merge_from(const DirtyBitmap& source) {
  uint64_t offset = 0;
  while (auto dirty = source.next_dirty(offset)) {
    const uint64_t end = source.next_zero(*dirty).value_or(source.size());
    set(*dirty, end - *dirty);
    offset = end;
  }
}

uint64_t DirtyBitmap::serialization_size(uint64_t offset, uint64_t bytes) const {
  const uint64_t bits = end_chunk(offset, bytes) - first_chunk(offset);
  return (bits + 7) / 8;
}

void DirtyBitmap::serialize_part(std::span<uint8_t> out, uint64_t offset, uint64_t bytes) const {
  const uint64_t first = first_chunk(offset);
  const uint64_t end = end_chunk(offset, bytes);
  std::fill(out.begin(), out.end(), 0);
  for (uint64_t i = first; i < end; ++i) {
    if (bit(i)) {
      const uint64_t at = i - first;
      out[at / 8] = static_cast<uint8_t>(out[at / 8] | (1u << (at % 8)));
    }
  }
}

void DirtyBitmap::deserialize_part(std::span<const uint8_t> in, uint64_t offset, uint64_t bytes) {
  const uint64_t first = first_chunk(offset);
  const uint64_t end = end_chunk(offset, bytes);
  for (uint64_t i = first; i < end; ++i) {
    const uint64_t at = i - first;
    const bool value = at / 8 < in.size() && ((in[at / 8] >> (at % 8)) & 1) != 0;
    set_bits(i, i + 1, value);
  }
}

std::vector<uint8_t> DirtyBitmap::hbitmap_bytes() const {
  std::vector<uint8_t> bytes(std::max<size_t>(words_.size(), 1) * 8, 0);
  for (size_t i = 0; i < words_.size(); ++i) {
    for (size_t b = 0; b < 8; ++b) {
      bytes[i * 8 + b] = static_cast<uint8_t>(words_[i] >> (8 * b));
    }
  }
  return bytes;
}

Result<void> check_bitmap(const DirtyBitmap& bitmap, unsigned checks) {
  const std::string quoted = "Bitmap '" + bitmap.name() + "'";
  if ((checks & kCheckBusy) != 0 && bitmap.busy()) {
    return make_error(ErrorKind::kBusy,
                      quoted + " is currently in use by another operation and cannot be used");
  }
  if ((checks & kCheckReadonly) != 0 && bitmap.readonly()) {
    return make_error(ErrorKind::kPermission, quoted + " is readonly and cannot be modified");
  }
  if ((checks & kCheckInconsistent) != 0 && bitmap.inconsistent()) {
    return make_error(ErrorKind::kInvalidArgument, quoted + " is inconsistent and cannot be used");
  }
  return ok();
}

// ---- BitmapSet ---------------------------------------------------------------------------------

DirtyBitmap* BitmapSet::find(std::string_view name) const {
  for (const auto& bitmap : bitmaps_) {
    if (bitmap->name() == name) {
      return bitmap.get();
    }
  }
  return nullptr;
}

std::shared_ptr<DirtyBitmap> BitmapSet::find_shared(std::string_view name) const {
  for (const auto& bitmap : bitmaps_) {
    if (bitmap->name() == name) {
      return bitmap;
    }
  }
  return nullptr;
}

DirtyBitmap& BitmapSet::add(std::unique_ptr<DirtyBitmap> bitmap) {
  bitmaps_.push_back(std::move(bitmap));
  return *bitmaps_.back();
}

void BitmapSet::remove(std::string_view name) {
  std::erase_if(bitmaps_, [&](const auto& bitmap) { return bitmap->name() == name; });
}

void BitmapSet::mark_dirty(uint64_t offset, uint64_t bytes) {
  for (const auto& bitmap : bitmaps_) {
    if (bitmap->enabled()) {
      bitmap->set(offset, bytes);
    }
  }
}

Result<void> check_new_bitmap(const BitmapSet& set, std::string_view name, uint64_t granularity) {
  if (name.empty()) {
    return make_error(ErrorKind::kInvalidArgument, "Bitmap name cannot be empty");
  }
  if (granularity < 512 || (granularity & (granularity - 1)) != 0) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Granularity must be power of 2 and at least 512");
  }
  if (set.find(name) != nullptr) {
    return make_error(ErrorKind::kInvalidArgument, "Bitmap already exists: " + std::string(name));
  }
  if (name.size() > kMaxNameLength) {
    return make_error(ErrorKind::kInvalidArgument, "Bitmap name too long: " + std::string(name));
  }
  return ok();
}

}  // namespace strata::block::bitmap
