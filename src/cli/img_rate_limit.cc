#include "cli/img_rate_limit.h"

#include <algorithm>

namespace strata::cli::img {

void WriteRateLimit::leak() {
  const auto now = std::chrono::steady_clock::now();
  const double seconds = std::chrono::duration<double>(now - last_).count();
  last_ = now;
  level_ = std::max(0.0, level_ - seconds * static_cast<double>(bytes_per_second_));
}

aio::Task<void> WriteRateLimit::admit(uint64_t bytes) {
  if (bytes_per_second_ == 0) {
    co_return;
  }
  const double bucket = static_cast<double>(bytes_per_second_) / 10;
  leak();
  while (level_ > bucket) {
    const double wait_seconds = (level_ - bucket) / static_cast<double>(bytes_per_second_);
    const auto wait = std::chrono::nanoseconds(static_cast<int64_t>(wait_seconds * 1e9) + 1);
    (void)co_await loop_.sleep_for(wait);
    leak();
  }
  level_ += static_cast<double>(bytes);
}

}  // namespace strata::cli::img
