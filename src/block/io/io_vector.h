#pragma once
// IoVector: a scatter/gather list of caller-owned buffers (QEMU's QEMUIOVector). Cheap to copy;
// never owns memory. Slices share the underlying buffers.
//
// Up to kInlineEntries entries are stored in the object itself, so the common one-buffer request
// (and its slices) costs no allocation; longer lists move to the heap.

#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

namespace strata::block {

class IoVector {
 public:
  static constexpr size_t kInlineEntries = 4;

  IoVector() = default;
  IoVector(void* buffer, size_t length) { append(buffer, length); }
  IoVector(const IoVector&) = default;
  IoVector& operator=(const IoVector&) = default;
  // Moving only steals the heap list; a moved-from vector must not be used again (as with the
  // std::vector-based version, its size() is left unchanged).
  IoVector(IoVector&& other) noexcept
      : inline_(other.inline_),
        heap_(std::move(other.heap_)),
        count_(other.count_),
        size_(other.size_) {
    other.drop_heap();
  }
  IoVector& operator=(IoVector&& other) noexcept {
    if (this != &other) {
      inline_ = other.inline_;
      heap_ = std::move(other.heap_);
      count_ = other.count_;
      size_ = other.size_;
      other.drop_heap();
    }
    return *this;
  }

  void append(void* buffer, size_t length) {
    if (length == 0) {
      return;
    }
    if (count_ < kInlineEntries) {
      inline_[count_] = iovec{buffer, length};
    } else {
      if (count_ == kInlineEntries) {
        heap_.assign(inline_.begin(), inline_.end());
      }
      heap_.push_back(iovec{buffer, length});
    }
    ++count_;
    size_ += length;
  }
  void append(const IoVector& other) {
    for (const auto& v : other.entries()) {
      append(v.iov_base, v.iov_len);
    }
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const iovec* data() const { return count_ <= kInlineEntries ? inline_.data() : heap_.data(); }
  unsigned count() const { return static_cast<unsigned>(count_); }
  std::span<const iovec> entries() const { return {data(), count_}; }

  // The bytes [offset, offset + length) of this vector, as a vector over the same buffers.
  IoVector slice(size_t offset, size_t length) const {
    IoVector out;
    for (const auto& v : entries()) {
      if (length == 0) {
        break;
      }
      if (offset >= v.iov_len) {
        offset -= v.iov_len;
        continue;
      }
      size_t take = v.iov_len - offset;
      if (take > length) {
        take = length;
      }
      out.append(static_cast<char*>(v.iov_base) + offset, take);
      length -= take;
      offset = 0;
    }
    return out;
  }

  // Copies out of / into the vector starting at byte `offset`; returns bytes copied.
  size_t copy_to(size_t offset, void* dest, size_t length) const {
    size_t done = 0;
    // The slice must outlive the loop: a range-for does not extend the life of a temporary that
    // only a member call's result (the span) refers to.
    const IoVector part = slice(offset, length);
    for (const auto& v : part.entries()) {
      std::memcpy(static_cast<char*>(dest) + done, v.iov_base, v.iov_len);
      done += v.iov_len;
    }
    return done;
  }
  size_t copy_from(size_t offset, const void* src, size_t length) const {
    size_t done = 0;
    // The slice must outlive the loop: a range-for does not extend the life of a temporary that
    // only a member call's result (the span) refers to.
    const IoVector part = slice(offset, length);
    for (const auto& v : part.entries()) {
      std::memcpy(v.iov_base, static_cast<const char*>(src) + done, v.iov_len);
      done += v.iov_len;
    }
    return done;
  }
  void fill(size_t offset, int byte, size_t length) const {
    // The slice must outlive the loop: a range-for does not extend the life of a temporary that
    // only a member call's result (the span) refers to.
    const IoVector part = slice(offset, length);
    for (const auto& v : part.entries()) {
      std::memset(v.iov_base, byte, v.iov_len);
    }
  }
  // True when every byte of the vector is zero.
  bool is_zero() const {
    for (const auto& v : entries()) {
      const auto* p = static_cast<const unsigned char*>(v.iov_base);
      for (size_t i = 0; i < v.iov_len; ++i) {
        if (p[i] != 0) {
          return false;
        }
      }
    }
    return true;
  }

 private:
  // After heap_ was moved away: keep data() and count() consistent.
  void drop_heap() {
    heap_.clear();
    if (count_ > kInlineEntries) {
      count_ = 0;
    }
  }

  std::array<iovec, kInlineEntries> inline_{};
  std::vector<iovec> heap_;  // all entries, once there are more than kInlineEntries
  size_t count_ = 0;
  size_t size_ = 0;
};

}  // namespace strata::block
