#pragma once
// BounceBuffer: an owned, zero-initialised buffer whose address is aligned for O_DIRECT. Internal
// to block/io.

#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "base/result.h"

namespace strata::block::io {

class BounceBuffer {
 public:
  BounceBuffer() = default;
  BounceBuffer(BounceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  BounceBuffer& operator=(BounceBuffer&& other) noexcept {
    if (this != &other) {
      std::free(data_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  BounceBuffer(const BounceBuffer&) = delete;
  BounceBuffer& operator=(const BounceBuffer&) = delete;
  ~BounceBuffer() { std::free(data_); }

  // `alignment` is rounded up to a power of two of at least sizeof(void*).
  static Result<BounceBuffer> allocate(size_t size, size_t alignment) {
    size_t align = std::bit_ceil(alignment < sizeof(void*) ? sizeof(void*) : alignment);
    void* memory = nullptr;
    int ret = posix_memalign(&memory, align, size == 0 ? align : size);
    if (ret != 0) {
      return Error::from_errno(ret, "Could not allocate bounce buffer");
    }
    std::memset(memory, 0, size);
    BounceBuffer buffer;
    buffer.data_ = static_cast<char*>(memory);
    buffer.size_ = size;
    return buffer;
  }

  char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace strata::block::io
