#pragma once
// qemu-img convert -r: QEMU's throttle group with only bps-write set (util/throttle.c with
// avg = RATE and the default max = avg / 10). A leaky bucket drains at RATE bytes per second; a
// write may start while the bucket holds no more than a tenth of a second's worth, and then adds
// its bytes (so one request may exceed the bucket; the next ones wait for it to drain).

#include <chrono>
#include <cstdint>

#include "aio/event_loop.h"
#include "aio/task.h"

namespace strata::cli::img {

class WriteRateLimit {
 public:
  // `bytes_per_second` 0 means unlimited.
  WriteRateLimit(aio::EventLoop& loop, uint64_t bytes_per_second)
      : loop_(loop), bytes_per_second_(bytes_per_second) {}

  // Waits until a write of `bytes` may start and accounts for it.
  aio::Task<void> admit(uint64_t bytes);

 private:
  void leak();

  aio::EventLoop& loop_;
  uint64_t bytes_per_second_;
  double level_ = 0;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

}  // namespace strata::cli::img
