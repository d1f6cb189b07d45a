#pragma once
// IoVector: a scatter/gather list of caller-owned buffers (QEMU's QEMUIOVector). Cheap to copy;
// never owns memory. Slices share the underlying buffers.

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace strata::block {

class IoVector {
 public:
  IoVector() = default;
  IoVector(void* buffer, size_t length) { append(buffer, length); }

  void append(void* buffer, size_t length) {
    if (length == 0) {
      return;
    }
    iov_.push_back(iovec{buffer, length});
    size_ += length;
  }
  void append(const IoVector& other) {
    for (const auto& v : other.iov_) {
      append(v.iov_base, v.iov_len);
    }
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const iovec* data() const { return iov_.data(); }
  unsigned count() const { return static_cast<unsigned>(iov_.size()); }
  const std::vector<iovec>& entries() const { return iov_; }

  // The bytes [offset, offset + length) of this vector, as a vector over the same buffers.
  IoVector slice(size_t offset, size_t length) const {
    IoVector out;
    for (const auto& v : iov_) {
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
    for (const auto& v : slice(offset, length).iov_) {
      std::memcpy(static_cast<char*>(dest) + done, v.iov_base, v.iov_len);
      done += v.iov_len;
    }
    return done;
  }
  size_t copy_from(size_t offset, const void* src, size_t length) const {
    size_t done = 0;
    for (const auto& v : slice(offset, length).iov_) {
      std::memcpy(v.iov_base, static_cast<const char*>(src) + done, v.iov_len);
      done += v.iov_len;
    }
    return done;
  }
  void fill(size_t offset, int byte, size_t length) const {
    for (const auto& v : slice(offset, length).iov_) {
      std::memset(v.iov_base, byte, v.iov_len);
    }
  }
  // True when every byte of the vector is zero.
  bool is_zero() const {
    for (const auto& v : iov_) {
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
  std::vector<iovec> iov_;
  size_t size_ = 0;
};

}  // namespace strata::block
