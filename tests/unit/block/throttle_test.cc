// Throttle groups (block/throttle/): QEMU's leaky-bucket arithmetic on an explicit clock, and
// the checks of ThrottleLimits with QEMU's messages.

#include "block/throttle/throttle_group.h"

#include <gtest/gtest.h>

namespace strata::block::throttle {
namespace {

constexpr uint64_t kSecond = 1'000'000'000;

Limits with(BucketIndex bucket, double avg, double max = 0, uint64_t burst_length = 1) {
  Limits limits;
  limits.buckets[bucket].avg = avg;
  limits.buckets[bucket].max = max;
  limits.buckets[bucket].burst_length = burst_length;
  return limits;
}

TEST(ThrottleStateTest, AverageRateWithoutBurstAllowsATenthOfASecond) {
  // 100 ops/s: the bucket holds avg/10 = 10 ops before requests wait.
  ThrottleState state(with(kOpsTotal, 100));
  uint64_t now = kSecond;
  for (int i = 0; i < 11; ++i) {
    EXPECT_EQ(state.wait_ns(Direction::kWrite, now), 0u) << i;
    state.account(Direction::kWrite, 4096);
  }
  // 11 ops in, 10 allowed: one op too many, which leaks in 1/100 s.
  EXPECT_EQ(state.wait_ns(Direction::kRead, now), kSecond / 100);
  // After that time the next request may go.
  now += kSecond / 100;
  EXPECT_EQ(state.wait_ns(Direction::kRead, now), 0u);
}

TEST(ThrottleStateTest, DirectionsFillOnlyTheirBuckets) {
  ThrottleState state(with(kBpsWrite, 1000));
  state.wait_ns(Direction::kWrite, 0);
  state.account(Direction::kWrite, 1100);  // 1000 over the 100-byte bucket
  EXPECT_EQ(state.wait_ns(Direction::kWrite, 0), kSecond);
  EXPECT_EQ(state.wait_ns(Direction::kRead, 0), 0u);
  state.account(Direction::kRead, 1 << 20);  // reads are not limited here
  EXPECT_EQ(state.wait_ns(Direction::kWrite, kSecond / 2), kSecond / 2);
}

TEST(ThrottleStateTest, BurstRateLastsItsLengthThenTheAverageApplies) {
  // 10 ops/s on average, bursts of 100 ops/s for 2 s: the main bucket holds 200 ops, the burst
  // bucket 10 ops at a time.
  ThrottleState state(with(kOpsTotal, 10, 100, 2));
  state.wait_ns(Direction::kRead, 0);
  for (int i = 0; i < 10; ++i) {
    state.account(Direction::kRead, 512);
  }
  EXPECT_EQ(state.wait_ns(Direction::kRead, 0), 0u);  // exactly full: not over
  state.account(Direction::kRead, 512);
  // One op over the burst bucket: it leaks at the burst rate, 1/100 s.
  EXPECT_EQ(state.wait_ns(Direction::kRead, 0), kSecond / 100);
}

TEST(ThrottleStateTest, IopsSizeCountsLargeRequestsAsSeveralOps) {
  Limits limits = with(kOpsTotal, 10);
  limits.op_size = 4096;
  ThrottleState state(limits);
  state.wait_ns(Direction::kWrite, 0);
  state.account(Direction::kWrite, 4096 * 3);  // 3 ops against a bucket of 1
  EXPECT_EQ(state.wait_ns(Direction::kWrite, 0), 2 * kSecond / 10);
}

TEST(ThrottleLimitsTest, ChecksUseQemuMessages) {
  EXPECT_TRUE(check_limits(Limits{}).ok());
  Limits both = with(kBpsTotal, 10);
  both.buckets[kBpsRead].avg = 5;
  EXPECT_EQ(check_limits(both).error().message(),
            "bps/iops/max total values and read/write values cannot be used at the same time");
  Limits no_iops;
  no_iops.op_size = 512;
  EXPECT_EQ(check_limits(no_iops).error().message(), "iops size requires an iops value to be set");
  EXPECT_EQ(check_limits(with(kOpsRead, 10, 0, 0)).error().message(),
            "the burst length cannot be 0");
  EXPECT_EQ(check_limits(with(kOpsRead, 10, 0, 3)).error().message(),
            "burst length set without burst rate");
  EXPECT_EQ(check_limits(with(kOpsRead, 0, 10)).error().message(),
            "bps_max/iops_max require corresponding bps/iops values");
  EXPECT_EQ(check_limits(with(kOpsRead, 20, 10)).error().message(),
            "bps_max/iops_max cannot be lower than bps/iops");
  EXPECT_EQ(check_limits(with(kBpsWrite, 2e15)).error().message(),
            "bps/iops/max values must be within [0, 1000000000000000]");
}

}  // namespace
}  // namespace strata::block::throttle
