#include "block/job/rate_limit.h"

#include <algorithm>

namespace strata::block::job {

void RateLimit::set_speed(uint64_t bytes_per_second, uint64_t slice_ns) {
  speed_ = bytes_per_second;
  slice_ns_ = slice_ns;
  // QEMU: MAX(1, speed * slice_ns / NANOSECONDS_PER_SECOND), computed in double.
  slice_quota_ =
      bytes_per_second == 0
          ? 0
          : std::max<uint64_t>(1, static_cast<uint64_t>(static_cast<double>(bytes_per_second) *
                                                        static_cast<double>(slice_ns) / 1e9));
}

uint64_t RateLimit::delay_ns(uint64_t bytes, uint64_t now_ns) {
  if (slice_quota_ == 0) {
    return 0;
  }
  if (slice_end_ns_ < now_ns) {
    // The previous (possibly extended) slice is over: start accounting afresh.
    slice_start_ns_ = now_ns;
    slice_end_ns_ = now_ns + slice_ns_;
    dispatched_ = 0;
  }
  dispatched_ += bytes;
  if (dispatched_ < slice_quota_) {
    return 0;
  }
  const double delay_slices = static_cast<double>(dispatched_) / static_cast<double>(slice_quota_);
  slice_end_ns_ =
      slice_start_ns_ + static_cast<uint64_t>(delay_slices * static_cast<double>(slice_ns_));
  return slice_end_ns_ > now_ns ? slice_end_ns_ - now_ns : 0;
}

}  // namespace strata::block::job
