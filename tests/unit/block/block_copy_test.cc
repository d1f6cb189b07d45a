// Block-copy (src/block/copy/): region states, parallel workers, a caller that waits only for
// its own clusters, failed tasks, write-zeroes for zero runs, sync=top skipping, cluster size,
// and the rate limit arithmetic (QEMU's ratelimit_calculate_delay).

#include "block/copy/block_copy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/job/rate_limit.h"
#include "ram_node_test_util.h"

namespace strata::block::copy {
namespace {

using testing::RamNode;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

class BlockCopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(*loop);
    source_ = std::make_shared<RamNode>("src", 4 * kMiB);
    target_ = std::make_shared<RamNode>("tgt", 4 * kMiB);
    for (size_t i = 0; i < source_->data().size(); ++i) {
      source_->data()[i] = static_cast<uint8_t>(i / (64 * kKiB) + 1);
    }
  }

  std::unique_ptr<BlockCopy> make(BlockCopyOptions options = {}) {
    auto made = BlockCopy::create(*source_, *target_, options);
    EXPECT_TRUE(made) << made.error().message();
    return std::move(made).value();
  }

  // Runs `body` on the loop; `body` may spawn work into `group_` and poll with settle().
  void run(aio::Task<void> body) {
    loop_->block_on(std::move(body));
    loop_->block_on(
        [](aio::TaskGroup& group) -> aio::Task<void> { co_await group.wait(); }(group_));
  }
  // Lets spawned coroutines run until nothing is ready any more.
  static aio::Task<void> settle() {
    for (int i = 0; i < 50; ++i) {
      co_await aio::EventLoop::current()->yield();
    }
  }

 public:  // the test bodies' coroutines reach these through a reference
  std::unique_ptr<aio::EventLoop> loop_;
  std::shared_ptr<RamNode> source_;
  std::shared_ptr<RamNode> target_;
  aio::TaskGroup group_;
};

TEST_F(BlockCopyTest, ClusterSizeIsTheLargestOfDefaultMinimumAndTarget) {
  auto plain = calculate_cluster_size(*target_, 0);
  EXPECT_EQ(plain.cluster_size, 64 * kKiB);
  ASSERT_TRUE(plain.warning);  // no cluster size, no backing file: QEMU warns
  EXPECT_NE(plain.warning->find("(default) block size of 65536 bytes"), std::string::npos);

  EXPECT_EQ(calculate_cluster_size(*target_, 256 * kKiB).cluster_size, 256 * kKiB);
  target_->reported_cluster_size = 128 * kKiB;
  auto qcow2_like = calculate_cluster_size(*target_, 0);
  EXPECT_EQ(qcow2_like.cluster_size, 128 * kKiB);
  EXPECT_FALSE(qcow2_like.warning);
  target_->reported_cluster_size = 4 * kKiB;
  EXPECT_EQ(calculate_cluster_size(*target_, 0).cluster_size, 64 * kKiB);
}

TEST_F(BlockCopyTest, WorkersRunInParallelUpToMaxWorkers) {
  auto copy = make();
  target_->hold();
  BlockCopy::Call call;
  call.bytes = copy->length();
  call.max_workers = 4;
  call.max_chunk = 64 * kKiB;
  bool done = false;
  Result<void> outcome = ok();
  run([](BlockCopyTest& t, BlockCopy& c, BlockCopy::Call& call, bool& done,
         Result<void>& outcome) -> aio::Task<void> {
    t.group_.spawn([](BlockCopy& c, BlockCopy::Call& call, bool& done,
                      Result<void>& outcome) -> aio::Task<void> {
      outcome = co_await c.run(call);
      done = true;
    }(c, call, done, outcome));
    co_await settle();
    // Four chunks in flight, the rest not started.
    EXPECT_EQ(t.target_->held(), 4);
    EXPECT_EQ(c.state_of(0), RegionState::kInFlight);
    EXPECT_EQ(c.state_of(3 * 64 * kKiB), RegionState::kInFlight);
    EXPECT_EQ(c.state_of(4 * 64 * kKiB), RegionState::kNotStarted);
    EXPECT_EQ(c.remaining_bytes(), c.length());
    EXPECT_FALSE(done);
    t.target_->release();
    co_await settle();
  }(*this, *copy, call, done, outcome));
  EXPECT_TRUE(done);
  EXPECT_TRUE(outcome) << outcome.error().message();
  EXPECT_EQ(target_->max_held(), 4);
  EXPECT_EQ(target_->writes.size(), 64u);  // 4 MiB in 64 KiB chunks
  EXPECT_EQ(copy->state_of(0), RegionState::kDone);
  EXPECT_EQ(copy->remaining_bytes(), 0u);
  EXPECT_TRUE(target_->data() == source_->data());
}

TEST_F(BlockCopyTest, ChunksAreAtMostOneMebibyteWithoutMaxChunk) {
  auto copy = make();
  BlockCopy::Call call;
  call.bytes = copy->length();
  auto outcome = loop_->block_on(copy->run(call));
  ASSERT_TRUE(outcome) << outcome.error().message();
  ASSERT_EQ(target_->writes.size(), 4u);
  for (const auto& write : target_->writes) {
    EXPECT_EQ(write.bytes, kMaxBuffer);
  }
  EXPECT_TRUE(target_->data() == source_->data());
}

TEST_F(BlockCopyTest, CallerWaitsOnlyForItsOwnClusters) {
  auto copy = make();
  target_->hold();
  BlockCopy::Call background;
  background.bytes = 64 * kKiB;  // claims cluster 0 only
  bool background_done = false;
  bool own_cluster_done = false;
  bool other_cluster_done = false;
  run([](BlockCopyTest& t, BlockCopy& c, BlockCopy::Call& background, bool& background_done,
         bool& own_done, bool& other_done) -> aio::Task<void> {
    t.group_.spawn([](BlockCopy& c, BlockCopy::Call& call, bool& done) -> aio::Task<void> {
      Result<void> copied = co_await c.run(call);
      EXPECT_TRUE(copied.ok());
      done = true;
    }(c, background, background_done));
    co_await settle();
    EXPECT_EQ(c.state_of(0), RegionState::kInFlight);
    // A guest write over cluster 0 must wait for the background task...
    t.group_.spawn([](BlockCopy& c, bool& done) -> aio::Task<void> {
      Result<void> copied = co_await c.copy_range(100, 4096);
      EXPECT_TRUE(copied.ok());
      done = true;
    }(c, own_done));
    co_await settle();
    EXPECT_FALSE(own_done);
    // ... while one over another cluster copies it itself (its write is held too: release the
    // gate only for it by letting everything go after checking the first is still waiting).
    t.group_.spawn([](BlockCopy& c, bool& done) -> aio::Task<void> {
      Result<void> copied = co_await c.copy_range(2 * kMiB + 10, 10);
      EXPECT_TRUE(copied.ok());
      done = true;
    }(c, other_done));
    co_await settle();
    EXPECT_EQ(c.state_of(2 * kMiB), RegionState::kInFlight);
    EXPECT_EQ(t.target_->held(), 2);  // the background task and the second caller's own task
    EXPECT_FALSE(own_done);
    t.target_->release();
    co_await settle();
  }(*this, *copy, background, background_done, own_cluster_done, other_cluster_done));
  EXPECT_TRUE(background_done);
  EXPECT_TRUE(own_cluster_done);
  EXPECT_TRUE(other_cluster_done);
  // The first caller did not copy cluster 0 again: one write at 0, one at 2 MiB.
  EXPECT_EQ(target_->writes.size(), 2u);
  EXPECT_EQ(copy->state_of(2 * kMiB), RegionState::kDone);
  EXPECT_EQ(copy->state_of(kMiB), RegionState::kNotStarted);
}

TEST_F(BlockCopyTest, FailedTaskPutsItsClustersBack) {
  auto copy = make();
  target_->fail_write_at = 3 * 64 * kKiB;
  BlockCopy::Call call;
  call.bytes = copy->length();
  call.max_workers = 1;
  call.max_chunk = 64 * kKiB;
  auto outcome = loop_->block_on(copy->run(call));
  ASSERT_FALSE(outcome);
  EXPECT_EQ(outcome.error().errno_value(), EIO);
  EXPECT_FALSE(call.error_is_read);
  EXPECT_EQ(copy->state_of(0), RegionState::kDone);
  EXPECT_EQ(copy->state_of(3 * 64 * kKiB), RegionState::kNotStarted);
  EXPECT_EQ(copy->remaining_bytes(), copy->length() - 3 * 64 * kKiB);
  // A retry after the fault is gone finishes the copy.
  target_->fail_write_at.reset();
  BlockCopy::Call retry;
  retry.bytes = copy->length();
  ASSERT_TRUE(loop_->block_on(copy->run(retry)));
  EXPECT_TRUE(target_->data() == source_->data());
}

TEST_F(BlockCopyTest, ZeroRunsAreWrittenAsZeroes) {
  source_->runs.push_back({kMiB, kMiB, BlockStatus::kZero | BlockStatus::kAllocated});
  std::fill(source_->data().begin() + kMiB, source_->data().begin() + 2 * kMiB, 0);
  std::fill(target_->data().begin(), target_->data().end(), 0xff);
  auto copy = make();
  BlockCopy::Call call;
  call.bytes = copy->length();
  ASSERT_TRUE(loop_->block_on(copy->run(call)));
  ASSERT_EQ(target_->zero_writes.size(), 1u);
  EXPECT_EQ(target_->zero_writes[0].offset, kMiB);
  EXPECT_EQ(target_->zero_writes[0].bytes, kMiB);
  EXPECT_TRUE(target_->data() == source_->data());
}

TEST_F(BlockCopyTest, SkipUnallocatedLeavesTargetUntouched) {
  source_->runs.push_back({0, 2 * kMiB, 0});  // not allocated in the top layer
  auto copy = make();
  copy->set_skip_unallocated(true);
  uint64_t done_bytes = 0;
  copy->set_progress({[&](uint64_t bytes) { done_bytes += bytes; }, nullptr});
  BlockCopy::Call call;
  call.bytes = copy->length();
  ASSERT_TRUE(loop_->block_on(copy->run(call)));
  EXPECT_EQ(done_bytes, 2 * kMiB);
  for (const auto& write : target_->writes) {
    EXPECT_GE(write.offset, 2 * kMiB);
  }
  EXPECT_EQ(copy->state_of(0), RegionState::kDone);
}

TEST_F(BlockCopyTest, ResetUnallocatedMarksRunsDone) {
  source_->runs.push_back({kMiB, kMiB, 0});
  auto copy = make();
  auto first = loop_->block_on(copy->reset_unallocated(0));
  ASSERT_TRUE(first);
  EXPECT_EQ(*first, kMiB);
  EXPECT_EQ(copy->state_of(0), RegionState::kNotStarted);
  auto second = loop_->block_on(copy->reset_unallocated(kMiB));
  ASSERT_TRUE(second);
  EXPECT_EQ(*second, kMiB);
  EXPECT_EQ(copy->state_of(kMiB), RegionState::kDone);
  EXPECT_EQ(copy->remaining_bytes(), 3 * kMiB);
}

TEST_F(BlockCopyTest, CancelStopsNewTasks) {
  auto copy = make();
  target_->hold();
  BlockCopy::Call call;
  call.bytes = copy->length();
  call.max_workers = 2;
  call.max_chunk = 64 * kKiB;
  Result<void> outcome = ok();
  run([](BlockCopyTest& t, BlockCopy& c, BlockCopy::Call& call,
         Result<void>& outcome) -> aio::Task<void> {
    t.group_.spawn([](BlockCopy& c, BlockCopy::Call& call, Result<void>& out) -> aio::Task<void> {
      out = co_await c.run(call);
    }(c, call, outcome));
    co_await settle();
    c.cancel(call);
    t.target_->release();
    co_await settle();
  }(*this, *copy, call, outcome));
  ASSERT_FALSE(outcome);
  EXPECT_EQ(outcome.error().kind(), ErrorKind::kCancelled);
  EXPECT_EQ(target_->writes.size(), 2u);  // only the two in flight at the cancel
  EXPECT_EQ(copy->remaining_bytes(), copy->length() - 2 * 64 * kKiB);
}

TEST(RateLimitTest, DelaysOnceTheSliceQuotaIsSpent) {
  job::RateLimit limit;
  EXPECT_EQ(limit.delay_ns(1 << 30, 0), 0u);  // unlimited
  limit.set_speed(10 * kMiB);                 // 1 MiB per 100 ms slice
  const uint64_t t0 = 1'000'000'000;
  EXPECT_EQ(limit.delay_ns(512 * kKiB, t0), 0u);
  // 1.5 MiB dispatched: the slice stretches to 150 ms from its start.
  EXPECT_EQ(limit.delay_ns(kMiB, t0 + 10'000'000), 140'000'000u);
  // After the stretched slice, accounting starts afresh.
  EXPECT_EQ(limit.delay_ns(64 * kKiB, t0 + 200'000'000), 0u);
}

}  // namespace
}  // namespace strata::block::copy
