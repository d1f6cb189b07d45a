// MirrorCore (src/block/mirror/mirror_core.h): what a guest write copied to the target does to the
// dirty bitmap (QEMU's do_sync_target_write: dirty unaligned edges are left to the background
// copy, inner granules become clean), a failed copy, and the range locks that keep guest writes
// and background copies of one region apart.

#include "block/mirror/mirror_core.h"

#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "ram_node_test_util.h"

namespace strata::block::mirror {
namespace {

using testing::RamNode;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kGranule = 64 * kKiB;

class Recorder : public MirrorCore::Listener {
 public:
  void dirtied() override { ++dirtied_calls; }
  void active_write_started(uint64_t bytes) override { started.push_back(bytes); }
  void active_write_finished(uint64_t bytes, bool copied) override {
    finished.push_back({bytes, copied});
  }
  void active_write_failed(int error) override { failures.push_back(error); }

  int dirtied_calls = 0;
  std::vector<uint64_t> started;
  std::vector<std::pair<uint64_t, bool>> finished;
  std::vector<int> failures;
};

class MirrorCoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(*loop);
    target_ = std::make_shared<RamNode>("tgt", 1024 * kKiB);
    core_ = std::make_shared<MirrorCore>(target_, 1024 * kKiB, kGranule, CopyMode::kWriteBlocking);
    core_->set_listener(&recorder_);
  }
  void TearDown() override { core_->set_listener(nullptr); }

  // A guest write of `bytes` bytes of `pattern` at `offset`, copied to the target.
  void guest_write(uint64_t offset, uint64_t bytes, uint8_t pattern) {
    std::vector<uint8_t> data(bytes, pattern);
    loop_->block_on(
        [](MirrorCore& core, uint64_t at, std::vector<uint8_t>& buffer) -> aio::Task<void> {
          IoVector qiov(buffer.data(), buffer.size());
          co_await core.write_to_target(WriteMethod::kCopy, at, buffer.size(), &qiov, 0);
        }(*core_, offset, data));
  }

  std::unique_ptr<aio::EventLoop> loop_;
  std::shared_ptr<RamNode> target_;
  std::shared_ptr<MirrorCore> core_;
  Recorder recorder_;
};

TEST_F(MirrorCoreTest, DirtyUnalignedEdgesAreLeftToTheBackgroundCopy) {
  core_->dirty().set(0, kGranule);  // the head granule is dirty, the tail one clean
  core_->dirty().set(kGranule, 2 * kGranule);
  guest_write(32 * kKiB, 200 * kKiB - 32 * kKiB, 0x5a);
  // The write from 64 KiB on reached the target; its dirty head granule did not.
  ASSERT_EQ(target_->writes.size(), 1u);
  EXPECT_EQ(target_->writes[0].offset, kGranule);
  EXPECT_EQ(target_->writes[0].bytes, 200 * kKiB - kGranule);
  EXPECT_TRUE(core_->dirty().test(0));
  EXPECT_FALSE(core_->dirty().test(kGranule));
  EXPECT_FALSE(core_->dirty().test(2 * kGranule));
  EXPECT_EQ(target_->data()[kGranule], 0x5a);
  EXPECT_EQ(target_->data()[200 * kKiB - 1], 0x5a);
  EXPECT_EQ(target_->data()[200 * kKiB], 0);
  EXPECT_EQ(target_->data()[32 * kKiB], 0);
  EXPECT_EQ(recorder_.started, std::vector<uint64_t>{200 * kKiB - kGranule});
  ASSERT_EQ(recorder_.finished.size(), 1u);
  EXPECT_TRUE(recorder_.finished[0].second);
}

TEST_F(MirrorCoreTest, AWriteInsideOneDirtyGranuleGoesNowhere) {
  core_->dirty().set(0, kGranule);
  guest_write(4 * kKiB, 8 * kKiB, 0x11);
  EXPECT_TRUE(target_->writes.empty());
  EXPECT_TRUE(core_->dirty().test(0));
  EXPECT_TRUE(recorder_.started.empty());
}

TEST_F(MirrorCoreTest, AFailedCopyMarksTheGranulesDirtyAndReports) {
  core_->set_actively_synced(true);
  target_->fail_write_at = 3 * kGranule;
  guest_write(2 * kGranule + 100, 2 * kGranule, 0x22);
  EXPECT_TRUE(core_->dirty().test(2 * kGranule));
  EXPECT_TRUE(core_->dirty().test(3 * kGranule));
  EXPECT_TRUE(core_->dirty().test(4 * kGranule));
  EXPECT_FALSE(core_->dirty().test(5 * kGranule));
  EXPECT_FALSE(core_->actively_synced());
  EXPECT_EQ(recorder_.failures, std::vector<int>{EIO});
  ASSERT_EQ(recorder_.finished.size(), 1u);
  EXPECT_FALSE(recorder_.finished[0].second);
}

TEST_F(MirrorCoreTest, MarkDirtyWakesTheJobAndEndsActiveSync) {
  core_->set_actively_synced(true);
  core_->mark_dirty(5 * kKiB, 1);
  EXPECT_TRUE(core_->dirty().test(0));
  EXPECT_FALSE(core_->actively_synced());
  EXPECT_EQ(recorder_.dirtied_calls, 1);
}

TEST_F(MirrorCoreTest, OverlappingRangesWaitForTheLockHolder) {
  bool overlapping_done = false;
  bool disjoint_done = false;
  loop_->block_on([](MirrorCore& core, bool& overlapping, bool& disjoint) -> aio::Task<void> {
    auto lock = std::make_unique<MirrorCore::RangeLock>(core, 0, kGranule);
    aio::TaskGroup waiters;
    waiters.spawn([](MirrorCore& c, bool& done) -> aio::Task<void> {
      co_await c.wait_for_overlaps(32 * kKiB, 96 * kKiB);
      done = true;
    }(core, overlapping));
    waiters.spawn([](MirrorCore& c, bool& done) -> aio::Task<void> {
      co_await c.wait_for_overlaps(kGranule, 2 * kGranule);
      done = true;
    }(core, disjoint));
    for (int i = 0; i < 10; ++i) {
      co_await aio::EventLoop::current()->yield();
    }
    EXPECT_TRUE(disjoint);
    EXPECT_FALSE(overlapping);
    EXPECT_TRUE(core.overlaps(0, 1));
    lock.reset();
    co_await waiters.wait();
    EXPECT_TRUE(overlapping);
    EXPECT_FALSE(core.overlaps(0, kGranule));
  }(*core_, overlapping_done, disjoint_done));
  EXPECT_TRUE(overlapping_done);
}

TEST_F(MirrorCoreTest, StoppedCoreCopiesNothing) {
  EXPECT_TRUE(core_->copies_to_target());
  core_->stop_copying();
  EXPECT_FALSE(core_->copies_to_target());
  core_->set_copy_mode(CopyMode::kBackground);
  EXPECT_FALSE(core_->stopped());
  core_->stop();
  EXPECT_TRUE(core_->stopped());
}

}  // namespace
}  // namespace strata::block::mirror
