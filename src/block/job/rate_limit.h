#pragma once
// QEMU's util/ratelimit: a byte budget per time slice. dispatched() bytes are accounted against
// the slice's quota; once over it, the caller is told how long to wait before going on (the slice
// is extended over as many slices as the bytes need). A speed of 0 means unlimited.

#include <chrono>
#include <cstdint>

namespace strata::block::job {

class RateLimit {
 public:
  // QEMU's BLOCK_JOB_SLICE_TIME / BLOCK_COPY_SLICE_TIME: 100 ms.
  static constexpr uint64_t kSliceNs = 100'000'000;

  // `bytes_per_second` 0: unlimited.
  void set_speed(uint64_t bytes_per_second, uint64_t slice_ns = kSliceNs);
  uint64_t speed() const { return speed_; }
  // Accounts `bytes` about to be sent and returns the nanoseconds to wait before sending more
  // (QEMU's ratelimit_calculate_delay). `now_ns` is a monotonic clock, injectable for tests.
  uint64_t delay_ns(uint64_t bytes, uint64_t now_ns);
  uint64_t delay_ns(uint64_t bytes) { return delay_ns(bytes, monotonic_now_ns()); }

  static uint64_t monotonic_now_ns() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }

 private:
  uint64_t speed_ = 0;
  uint64_t slice_ns_ = kSliceNs;
  uint64_t slice_quota_ = 0;
  uint64_t slice_start_ns_ = 0;
  uint64_t slice_end_ns_ = 0;
  uint64_t dispatched_ = 0;
};

}  // namespace strata::block::job
