#pragma once
// Little-endian field encoding for the migration format: an appending encoder and a bounds-checked
// decoder. Every integer of the format is little-endian (docs/migration-format.md "Conventions").

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace strata::migration {

inline void store_le(uint8_t* p, uint64_t value, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) {
    p[i] = static_cast<uint8_t>(value >> (8 * i));
  }
}

inline uint64_t load_le(const uint8_t* p, size_t bytes) {
  uint64_t value = 0;
  for (size_t i = 0; i < bytes; ++i) {
    value |= uint64_t{p[i]} << (8 * i);
  }
  return value;
}

class WireEncoder {
 public:
  void u16(uint16_t value) { put(value, 2); }
  void u32(uint32_t value) { put(value, 4); }
  void u64(uint64_t value) { put(value, 8); }
  void bytes(std::string_view text) { bytes_.insert(bytes_.end(), text.begin(), text.end()); }
  void zeros(size_t count) { bytes_.insert(bytes_.end(), count, 0); }

  size_t size() const { return bytes_.size(); }
  std::vector<uint8_t>& data() { return bytes_; }

 private:
  void put(uint64_t value, size_t width) {
    size_t at = bytes_.size();
    bytes_.resize(at + width);
    store_le(bytes_.data() + at, value, width);
  }

  std::vector<uint8_t> bytes_;
};

// Reads fields in order; a read past the end sets failed() and yields zeros, so a decoder checks
// once after reading a whole record.
class WireDecoder {
 public:
  explicit WireDecoder(std::span<const uint8_t> bytes) : bytes_(bytes) {}

  uint16_t u16() { return static_cast<uint16_t>(get(2)); }
  uint32_t u32() { return static_cast<uint32_t>(get(4)); }
  uint64_t u64() { return get(8); }
  std::string text(size_t length) {
    if (!take(length)) {
      return {};
    }
    return std::string(reinterpret_cast<const char*>(bytes_.data() + position_ - length), length);
  }

  bool failed() const { return failed_; }
  size_t position() const { return position_; }
  size_t remaining() const { return failed_ ? 0 : bytes_.size() - position_; }

 private:
  bool take(size_t width) {
    if (failed_ || bytes_.size() - position_ < width) {
      failed_ = true;
      return false;
    }
    position_ += width;
    return true;
  }
  uint64_t get(size_t width) {
    if (!take(width)) {
      return 0;
    }
    return load_le(bytes_.data() + position_ - width, width);
  }

  std::span<const uint8_t> bytes_;
  size_t position_ = 0;
  bool failed_ = false;
};

}  // namespace strata::migration
