// The job core against QEMU's job.c: transitions, verbs and their messages, the order of status
// changes for success, failure, cancel, pause, manual finalize/dismiss and ready/complete.

#include "block/job/job.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "aio/event_loop.h"
#include "aio/sync.h"

namespace strata::block::job {
namespace {

// A job whose run() waits for `gate`, optionally passes a pause point or becomes ready, and
// then returns `outcome`.
class TestJob : public Job {
 public:
  TestJob(std::string id, Flags flags) : Job(std::move(id), "create", flags) {}

  aio::Event gate;
  bool pause_point_after_gate = false;
  bool become_ready = false;
  Result<void> outcome;
  std::vector<std::string> hooks;

 protected:
  aio::Task<Result<void>> run() override {
    progress_set_remaining(2);
    co_await gate.wait();
    progress_update(1);
    if (pause_point_after_gate) {
      co_await pause_point();
    }
    if (become_ready) {
      transition_to_ready();
      while (!completed_ && !is_cancelled()) {
        co_await yield();
      }
    }
    progress_update(1);
    co_return outcome;
  }
  void commit() override { hooks.push_back("commit"); }
  void abort() override { hooks.push_back("abort"); }
  void clean() override { hooks.push_back("clean"); }
  bool supports_complete() const override { return true; }
  Result<void> complete() override {
    completed_ = true;
    return ok();
  }

 private:
  bool completed_ = false;
};

class JobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loop = aio::EventLoop::create();
    ASSERT_TRUE(loop) << loop.error().message();
    loop_ = std::move(*loop);
    manager_ = std::make_unique<JobManager>(*loop_, [this](const Job& job) {
      events_.push_back(job.id() + ":" + std::string(status_name(job.status())));
    });
  }
  void TearDown() override {
    loop_->block_on(manager_->cancel_all());
    manager_.reset();
  }

  TestJob* add(std::string id, Job::Flags flags = {}) {
    auto job = std::make_unique<TestJob>(std::move(id), flags);
    TestJob* raw = job.get();
    auto created = manager_->create(std::move(job));
    EXPECT_TRUE(created) << created.error().message();
    return created ? raw : nullptr;
  }
  // Runs `fn` inside a loop iteration, then lets scheduled coroutines run.
  template <typename F>
  void step(F fn) {
    loop_->block_on([](aio::EventLoop& loop, F& body) -> aio::Task<void> {
      co_await loop.yield();
      body();
      for (int i = 0; i < 8; ++i) {
        co_await loop.yield();
      }
    }(*loop_, fn));
  }
  std::vector<std::string> take_events() { return std::exchange(events_, {}); }

  std::unique_ptr<aio::EventLoop> loop_;
  std::unique_ptr<JobManager> manager_;
  std::vector<std::string> events_;
};

using Events = std::vector<std::string>;

TEST(JobTables, MatchQemu) {
  EXPECT_TRUE(transition_allowed(JobStatus::kCreated, JobStatus::kRunning));
  EXPECT_TRUE(transition_allowed(JobStatus::kReady, JobStatus::kStandby));
  EXPECT_TRUE(transition_allowed(JobStatus::kAborting, JobStatus::kAborting));
  EXPECT_FALSE(transition_allowed(JobStatus::kRunning, JobStatus::kConcluded));
  EXPECT_FALSE(transition_allowed(JobStatus::kPaused, JobStatus::kAborting));
  EXPECT_FALSE(transition_allowed(JobStatus::kNull, JobStatus::kCreated));
  EXPECT_TRUE(verb_allowed(JobVerb::kCancel, JobStatus::kPending));
  EXPECT_FALSE(verb_allowed(JobVerb::kCancel, JobStatus::kConcluded));
  EXPECT_TRUE(verb_allowed(JobVerb::kComplete, JobStatus::kReady));
  EXPECT_FALSE(verb_allowed(JobVerb::kComplete, JobStatus::kStandby));
  EXPECT_TRUE(verb_allowed(JobVerb::kDismiss, JobStatus::kConcluded));
  EXPECT_FALSE(verb_allowed(JobVerb::kPause, JobStatus::kWaiting));
  EXPECT_EQ(verb_name(JobVerb::kSetSpeed), "set-speed");
  EXPECT_EQ(status_name(JobStatus::kStandby), "standby");
}

TEST(JobIds, WellFormed) {
  EXPECT_TRUE(id_wellformed("job0"));
  EXPECT_TRUE(id_wellformed("a-b.c_d"));
  EXPECT_FALSE(id_wellformed(""));
  EXPECT_FALSE(id_wellformed("1x"));
  EXPECT_FALSE(id_wellformed("_x"));
  EXPECT_FALSE(id_wellformed("a b"));
  EXPECT_FALSE(id_wellformed("a#"));
}

TEST_F(JobTest, CreateChecksIds) {
  ASSERT_NE(add("j"), nullptr);
  auto duplicate = manager_->create(std::make_unique<TestJob>("j", Job::Flags{}));
  ASSERT_FALSE(duplicate);
  EXPECT_EQ(duplicate.error().message(), "Job ID 'j' already in use");
  auto invalid = manager_->create(std::make_unique<TestJob>("9", Job::Flags{}));
  ASSERT_FALSE(invalid);
  EXPECT_EQ(invalid.error().message(), "Invalid job ID '9'");
  EXPECT_EQ(take_events(), (Events{"j:created"}));
}

TEST_F(JobTest, SuccessWithAutoDismiss) {
  TestJob* job = add("j");
  step([&] { manager_->start(*job); });
  EXPECT_EQ(job->status(), JobStatus::kRunning);
  EXPECT_EQ(job->info()["current-progress"], 1 - 1);
  EXPECT_EQ(job->info()["total-progress"], 2);
  step([&] { job->gate.set(); });
  EXPECT_EQ(manager_->find("j"), nullptr);
  EXPECT_EQ(take_events(),
            (Events{"j:created", "j:running", "j:waiting", "j:pending", "j:concluded", "j:null"}));
}

TEST_F(JobTest, ManualDismissKeepsConcludedJob) {
  TestJob* job = add("j", {.auto_finalize = true, .auto_dismiss = false});
  step([&] { manager_->start(*job); });
  step([&] { job->gate.set(); });
  ASSERT_EQ(manager_->find("j"), job);
  EXPECT_EQ(job->status(), JobStatus::kConcluded);
  EXPECT_EQ(job->hooks, (std::vector<std::string>{"commit", "clean"}));
  nlohmann::json info = job->info();
  EXPECT_EQ(info, (nlohmann::json{{"id", "j"},
                                  {"type", "create"},
                                  {"status", "concluded"},
                                  {"current-progress", 2},
                                  {"total-progress", 2}}));
  auto paused = manager_->user_pause(*job);
  ASSERT_FALSE(paused);
  EXPECT_EQ(paused.error().message(),
            "Job 'j' in state 'concluded' cannot accept command verb 'pause'");
  auto resumed = manager_->user_resume(*job);
  ASSERT_FALSE(resumed);
  EXPECT_EQ(resumed.error().message(), "Can't resume a job that was not paused");
  ASSERT_TRUE(manager_->dismiss(*job));
  EXPECT_EQ(manager_->find("j"), nullptr);
  EXPECT_EQ(take_events().back(), "j:null");
}

TEST_F(JobTest, FailureAborts) {
  TestJob* job = add("j", {.auto_finalize = true, .auto_dismiss = false});
  job->outcome = make_error(ErrorKind::kInvalidArgument, "broken");
  step([&] { manager_->start(*job); });
  step([&] { job->gate.set(); });
  EXPECT_EQ(take_events(), (Events{"j:created", "j:running", "j:aborting", "j:concluded"}));
  EXPECT_EQ(job->info()["error"], "broken");
  EXPECT_EQ(job->hooks, (std::vector<std::string>{"abort", "clean"}));
}

TEST_F(JobTest, VerbsRefusedWhileRunning) {
  TestJob* job = add("j");
  step([&] { manager_->start(*job); });
  auto complete = manager_->user_complete(*job);
  ASSERT_FALSE(complete);
  EXPECT_EQ(complete.error().message(),
            "Job 'j' in state 'running' cannot accept command verb 'complete'");
  auto finalize = manager_->finalize(*job);
  ASSERT_FALSE(finalize);
  EXPECT_EQ(finalize.error().message(),
            "Job 'j' in state 'running' cannot accept command verb 'finalize'");
  auto dismiss = manager_->dismiss(*job);
  ASSERT_FALSE(dismiss);
  EXPECT_EQ(dismiss.error().message(),
            "Job 'j' in state 'running' cannot accept command verb 'dismiss'");
  step([&] { job->gate.set(); });
}

TEST_F(JobTest, PauseAtPausePointAndResume) {
  TestJob* job = add("j");
  job->pause_point_after_gate = true;
  step([&] { manager_->start(*job); });
  ASSERT_TRUE(manager_->user_pause(*job));
  auto again = manager_->user_pause(*job);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().message(), "Job is already paused");
  step([&] { job->gate.set(); });
  EXPECT_EQ(job->status(), JobStatus::kPaused);
  ASSERT_TRUE(manager_->user_resume(*job));
  step([] {});
  EXPECT_EQ(manager_->find("j"), nullptr);
  EXPECT_EQ(take_events(), (Events{"j:created", "j:running", "j:paused", "j:running", "j:waiting",
                                   "j:pending", "j:concluded", "j:null"}));
}

TEST_F(JobTest, CancelOfRunningJobEndsCanceled) {
  TestJob* job = add("j", {.auto_finalize = true, .auto_dismiss = false});
  step([&] { manager_->start(*job); });
  ASSERT_TRUE(manager_->user_cancel(*job, true));
  EXPECT_TRUE(job->is_cancelled());
  step([&] { job->gate.set(); });
  EXPECT_EQ(job->status(), JobStatus::kConcluded);
  EXPECT_EQ(job->info()["error"], "Operation canceled");
  EXPECT_EQ(take_events(), (Events{"j:created", "j:running", "j:aborting", "j:concluded"}));
  auto cancel = manager_->user_cancel(*job, true);
  ASSERT_FALSE(cancel);
  EXPECT_EQ(cancel.error().message(),
            "Job 'j' in state 'concluded' cannot accept command verb 'cancel'");
}

TEST_F(JobTest, CancelOfUnstartedJobDismissesIt) {
  TestJob* job = add("j", {.auto_finalize = true, .auto_dismiss = false});
  ASSERT_TRUE(manager_->user_cancel(*job, true));
  EXPECT_EQ(manager_->find("j"), nullptr);
  EXPECT_EQ(take_events(), (Events{"j:created", "j:aborting", "j:concluded", "j:null"}));
}

TEST_F(JobTest, ManualFinalizeWaitsInPending) {
  TestJob* job = add("j", {.auto_finalize = false, .auto_dismiss = true});
  step([&] { manager_->start(*job); });
  step([&] { job->gate.set(); });
  EXPECT_EQ(job->status(), JobStatus::kPending);
  EXPECT_TRUE(job->hooks.empty());
  ASSERT_TRUE(manager_->finalize(*job));
  EXPECT_EQ(manager_->find("j"), nullptr);
  EXPECT_EQ(take_events(),
            (Events{"j:created", "j:running", "j:waiting", "j:pending", "j:concluded", "j:null"}));
}

TEST_F(JobTest, CancelInPendingAborts) {
  TestJob* job = add("j", {.auto_finalize = false, .auto_dismiss = false});
  step([&] { manager_->start(*job); });
  step([&] { job->gate.set(); });
  ASSERT_TRUE(manager_->user_cancel(*job, true));
  EXPECT_EQ(job->status(), JobStatus::kConcluded);
  EXPECT_EQ(job->hooks, (std::vector<std::string>{"abort", "clean"}));
  EXPECT_EQ(job->info()["error"], "Operation canceled");
}

TEST_F(JobTest, ReadyJobPausesToStandbyAndCompletes) {
  TestJob* job = add("j");
  job->become_ready = true;
  step([&] { manager_->start(*job); });
  step([&] { job->gate.set(); });
  EXPECT_EQ(job->status(), JobStatus::kReady);
  step([&] { ASSERT_TRUE(manager_->user_pause(*job)); });
  EXPECT_EQ(job->status(), JobStatus::kStandby);
  auto refused = manager_->user_complete(*job);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().message(),
            "Job 'j' in state 'standby' cannot accept command verb 'complete'");
  ASSERT_TRUE(manager_->user_resume(*job));
  step([] {});
  ASSERT_TRUE(manager_->user_complete(*job));
  step([] {});
  EXPECT_EQ(manager_->find("j"), nullptr);
  EXPECT_EQ(take_events(), (Events{"j:created", "j:running", "j:ready", "j:standby", "j:ready",
                                   "j:waiting", "j:pending", "j:concluded", "j:null"}));
}

TEST_F(JobTest, CancelAllEndsEveryJob) {
  TestJob* running = add("a", {.auto_finalize = true, .auto_dismiss = false});
  TestJob* concluded = add("b", {.auto_finalize = true, .auto_dismiss = false});
  step([&] {
    manager_->start(*running);
    manager_->start(*concluded);
  });
  step([&] { concluded->gate.set(); });
  EXPECT_EQ(manager_->jobs().size(), 2u);
  EXPECT_EQ(manager_->jobs().front()->id(), "b");  // newest first
  loop_->block_on([](TestJob* job, JobManager& manager) -> aio::Task<void> {
    job->gate.set();
    co_await manager.cancel_all();
  }(running, *manager_));
  EXPECT_TRUE(manager_->jobs().empty());
}

}  // namespace
}  // namespace strata::block::job
