// Job transactions (completion-mode grouped) and block job events against QEMU's job.c and
// blockjob.c: members go pending together, one failure aborts them all, BLOCK_JOB_* events come
// in QEMU's place in the status sequence, the `stop` error policy pauses the job as a user pause.

#include <gtest/gtest.h>

#include <cerrno>
#include <functional>
#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "block/job/block_job.h"
#include "block/job/job.h"

namespace strata::block::job {
namespace {

class GateJob : public BlockJob {
 public:
  GateJob(std::string id, Flags flags, std::vector<std::string>& log)
      : BlockJob(std::move(id), "backup", flags), log_(log) {}

  aio::Event gate;
  Result<void> outcome;
  bool error_then_retry = false;

 protected:
  aio::Task<Result<void>> run() override {
    progress_set_remaining(1);
    while (!gate.is_set() && !is_cancelled()) {
      co_await gate.wait();
    }
    if (error_then_retry) {
      if (error_action(OnError::kStop, false, EIO) == ErrorAction::kStop) {
        co_await pause_point();
      }
    }
    progress_update(1);
    co_return outcome;
  }
  bool on_cancel(bool force) override {
    gate.set();  // lets run() notice the cancel
    return force || true;
  }
  void commit() override { log_.push_back(id() + ":commit"); }
  void abort() override { log_.push_back(id() + ":abort"); }

 private:
  std::vector<std::string>& log_;
};

class JobTxnTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(*loop);
    manager_ = std::make_unique<JobManager>(*loop_, [this](const Job& job) {
      log_.push_back(job.id() + ":" + std::string(status_name(job.status())));
    });
    manager_->set_event_sink([this](std::string name, nlohmann::json data) {
      std::string who = data.contains("device") ? data["device"].get<std::string>()
                                                : data["id"].get<std::string>();
      std::string entry = who + ":" + name;
      if (data.contains("action")) {
        entry += "(" + data["action"].get<std::string>() + ")";
      }
      if (data.contains("error")) {
        entry += "(" + data["error"].get<std::string>() + ")";
      }
      log_.push_back(entry);
    });
  }
  void TearDown() override {
    loop_->block_on(manager_->cancel_all());
    manager_.reset();
  }

  GateJob* add(std::string id, std::shared_ptr<JobTxn> txn = nullptr, Job::Flags flags = {}) {
    auto job = std::make_unique<GateJob>(std::move(id), flags, log_);
    GateJob* raw = job.get();
    auto created = manager_->create(std::move(job), std::move(txn));
    EXPECT_TRUE(created) << created.error().message();
    return raw;
  }
  // Runs `action` on the loop, then lets the loop run until nothing is ready.
  void step(const std::function<void()>& action) {
    loop_->block_on([](const std::function<void()>& fn) -> aio::Task<void> {
      fn();
      for (int i = 0; i < 20; ++i) {
        co_await aio::EventLoop::current()->yield();
      }
    }(action));
  }
  void settle() {
    step([] {});
  }

  std::unique_ptr<aio::EventLoop> loop_;
  std::unique_ptr<JobManager> manager_;
  std::vector<std::string> log_;
};

TEST_F(JobTxnTest, GroupedJobsGoPendingTogether) {
  auto txn = JobManager::new_txn();
  GateJob* a = add("a", txn);
  GateJob* b = add("b", txn);
  step([&] { manager_->start(*a); });
  step([&] { manager_->start(*b); });
  log_.clear();
  step([&] { a->gate.set(); });
  EXPECT_EQ(log_, (std::vector<std::string>{"a:waiting"}));
  step([&] { b->gate.set(); });
  EXPECT_EQ(log_, (std::vector<std::string>{"a:waiting", "b:waiting", "a:pending", "b:pending",
                                            "a:commit", "a:BLOCK_JOB_COMPLETED", "a:concluded",
                                            "a:null", "b:commit", "b:BLOCK_JOB_COMPLETED",
                                            "b:concluded", "b:null"}));
}

TEST_F(JobTxnTest, OneFailureAbortsTheWholeGroup) {
  auto txn = JobManager::new_txn();
  GateJob* a = add("a", txn);
  GateJob* b = add("b", txn);
  step([&] { manager_->start(*a); });
  step([&] { manager_->start(*b); });
  log_.clear();
  a->outcome = Error::from_errno(ENOSPC, "");
  step([&] { a->gate.set(); });
  // b is force-cancelled; both are finalized once b's run() has returned.
  EXPECT_EQ(log_, (std::vector<std::string>{"a:aborting", "b:aborting", "a:abort",
                                            "a:BLOCK_JOB_COMPLETED(No space left on device)",
                                            "a:concluded", "a:null", "b:abort",
                                            "b:BLOCK_JOB_CANCELLED", "b:concluded", "b:null"}));
}

TEST_F(JobTxnTest, ManualFinalizeEmitsPendingAndFinalizesTheGroup) {
  auto txn = JobManager::new_txn();
  Job::Flags manual;
  manual.auto_finalize = false;
  GateJob* a = add("a", txn, manual);
  GateJob* b = add("b", txn);
  step([&] { manager_->start(*a); });
  step([&] { manager_->start(*b); });
  step([&] { a->gate.set(); });
  step([&] { b->gate.set(); });
  log_.clear();
  ASSERT_TRUE(manager_->finalize(*b));  // finalizes the whole txn
  EXPECT_EQ(log_, (std::vector<std::string>{"a:commit", "a:BLOCK_JOB_COMPLETED", "a:concluded",
                                            "a:null", "b:commit", "b:BLOCK_JOB_COMPLETED",
                                            "b:concluded", "b:null"}));
}

TEST_F(JobTxnTest, PendingEventOnlyWithoutAutoFinalize) {
  Job::Flags manual;
  manual.auto_finalize = false;
  GateJob* a = add("a", nullptr, manual);
  step([&] { manager_->start(*a); });
  log_.clear();
  step([&] { a->gate.set(); });
  EXPECT_EQ(log_, (std::vector<std::string>{"a:waiting", "a:pending", "a:BLOCK_JOB_PENDING"}));
  auto finalized = manager_->finalize(*a);
  EXPECT_TRUE(finalized);
}

TEST_F(JobTxnTest, StopPolicyPausesLikeAUserAndResumeContinues) {
  GateJob* a = add("a");
  a->error_then_retry = true;
  step([&] { manager_->start(*a); });
  log_.clear();
  step([&] { a->gate.set(); });
  EXPECT_EQ(log_, (std::vector<std::string>{"a:BLOCK_JOB_ERROR(stop)", "a:paused"}));
  EXPECT_TRUE(a->user_paused());
  EXPECT_EQ(a->block_info()["io-status"], "failed");
  log_.clear();
  loop_->block_on(
      [](JobManager& manager, GateJob& job, std::vector<std::string>& log) -> aio::Task<void> {
        EXPECT_TRUE(manager.user_resume(job));
        // running shows before user_resume returns (QEMU enters the job at once).
        EXPECT_EQ(log, (std::vector<std::string>{"a:running"}));
        co_return;
      }(*manager_, *a, log_));
  settle();
  EXPECT_EQ(log_.back(), "a:null");
}

TEST_F(JobTxnTest, SetSpeedChecksVerbAndSign) {
  GateJob* a = add("a");
  auto negative = manager_->set_speed(*a, -1);
  ASSERT_FALSE(negative);
  EXPECT_EQ(negative.error().message(), "Parameter 'speed' expects a non-negative value");
  ASSERT_TRUE(manager_->set_speed(*a, 4096));
  EXPECT_EQ(a->block_info()["speed"], 4096);
  step([&] { manager_->start(*a); });
  step([&] { a->gate.set(); });
}

TEST_F(JobTxnTest, DrainedStartShowsPausedRunningPair) {
  GateJob* a = add("a");
  log_.clear();
  step([&] {
    manager_->start(*a, /*drained=*/true);
    // The pair is complete when start() returns.
    EXPECT_EQ(log_, (std::vector<std::string>{"a:running", "a:paused", "a:running"}));
  });
  step([&] { a->gate.set(); });
}

}  // namespace
}  // namespace strata::block::job
