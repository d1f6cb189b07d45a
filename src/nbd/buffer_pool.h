#pragma once
// BufferPool: page-aligned payload buffers for one connection, recycled by power-of-two size
// class so the steady state of a request stream allocates nothing (aligned_alloc per request
// showed up as a fifth of the CPU time of 4 KiB reads). Buffers of up to kMaxPooledSize are kept,
// at most kMaxPerClass per class; larger ones are allocated and freed directly.
//
// Not thread-safe: one connection's coroutines on one loop. The pool must outlive its buffers.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace strata::nbd {

class BufferPool {
 public:
  static constexpr size_t kMinSize = 4096;
  static constexpr size_t kMaxPooledSize = 1u << 20;
  static constexpr size_t kMaxPerClass = 64;

  class Deleter {
   public:
    Deleter() = default;
    Deleter(BufferPool* pool, size_t capacity) : pool_(pool), capacity_(capacity) {}
    void operator()(char* p) const {
      if (pool_ != nullptr) {
        pool_->release(p, capacity_);
      } else {
        std::free(p);
      }
    }

   private:
    BufferPool* pool_ = nullptr;
    size_t capacity_ = 0;
  };
  using Buffer = std::unique_ptr<char, Deleter>;

  BufferPool() = default;
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A buffer of at least `length` bytes (at least 1), aligned to 4096; null when out of memory.
  Buffer acquire(uint64_t length);

 private:
  static constexpr size_t kClasses = 9;  // 4 KiB .. 1 MiB
  void release(char* p, size_t capacity);
  std::vector<char*> free_[kClasses];
};

}  // namespace strata::nbd
