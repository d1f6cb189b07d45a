#include "nbd/buffer_pool.h"

namespace strata::nbd {

namespace {

// Size class of `capacity` (a power of two from kMinSize to kMaxPooledSize).
size_t class_of(size_t capacity) {
  size_t index = 0;
  for (size_t size = BufferPool::kMinSize; size < capacity; size <<= 1) {
    ++index;
  }
  return index;
}

}  // namespace

BufferPool::~BufferPool() {
  for (auto& list : free_) {
    for (char* p : list) {
      std::free(p);
    }
  }
}

BufferPool::Buffer BufferPool::acquire(uint64_t length) {
  if (length > kMaxPooledSize) {
    size_t rounded = static_cast<size_t>((length + 4095) & ~uint64_t{4095});
    return Buffer(static_cast<char*>(std::aligned_alloc(4096, rounded)), Deleter());
  }
  size_t capacity = kMinSize;
  while (capacity < length) {
    capacity <<= 1;
  }
  auto& list = free_[class_of(capacity)];
  if (!list.empty()) {
    char* p = list.back();
    list.pop_back();
    return Buffer(p, Deleter(this, capacity));
  }
  char* p = static_cast<char*>(std::aligned_alloc(4096, capacity));
  if (p == nullptr) {
    return Buffer(nullptr, Deleter());
  }
  return Buffer(p, Deleter(this, capacity));
}

void BufferPool::release(char* p, size_t capacity) {
  auto& list = free_[class_of(capacity)];
  if (list.size() < kMaxPerClass) {
    list.push_back(p);
  } else {
    std::free(p);
  }
}

}  // namespace strata::nbd
