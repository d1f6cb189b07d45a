#pragma once
// Background jobs (QEMU's job.c): the job state machine, the verbs a user may apply in each state,
// auto-finalize / auto-dismiss, and the JOB_STATUS_CHANGE notifications in QEMU's order. Concrete
// jobs (blockdev-create today; stream, backup, commit, mirror later) derive from Job and
// implement run(); the JobManager owns them and runs them as coroutines on one event loop.
//
// Lifecycle of a job that succeeds (each arrow is one status change, notified):
//   created -> running [-> paused -> running]* [-> ready <-> standby]* -> waiting -> pending
//   -> concluded -> null
// A job whose run() fails, or that is cancelled, goes running -> aborting -> concluded -> null.
// pending waits for job-finalize unless auto-finalize; concluded waits for job-dismiss unless
// auto-dismiss. Transactions of several jobs are not modelled: every job is its own transaction.
//
// Threading: everything runs on the manager's loop thread.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/event_loop.h"
#include "aio/sync.h"
#include "aio/task.h"
#include "aio/task_group.h"
#include "base/result.h"

namespace strata::block::job {

// QAPI JobStatus, in QEMU's order (the tables below are indexed by it).
enum class JobStatus {
  kUndefined,
  kCreated,
  kRunning,
  kPaused,
  kReady,
  kStandby,
  kWaiting,
  kPending,
  kAborting,
  kConcluded,
  kNull,
};

// QAPI JobVerb.
enum class JobVerb { kCancel, kPause, kResume, kSetSpeed, kComplete, kFinalize, kDismiss, kChange };

std::string_view status_name(JobStatus status);
std::string_view verb_name(JobVerb verb);
// QEMU's JobSTT: may a job go from `from` to `to`?
bool transition_allowed(JobStatus from, JobStatus to);
// QEMU's JobVerbTable: may `verb` be applied in `status`?
bool verb_allowed(JobVerb verb, JobStatus status);
// QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
bool id_wellformed(std::string_view id);

class JobManager;

class Job {
 public:
  struct Flags {
    bool auto_finalize = true;
    bool auto_dismiss = true;
  };

  // `type` is the QAPI JobType ("create", "stream", "mirror", ...).
  Job(std::string id, std::string type, Flags flags);
  virtual ~Job() = default;
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  const std::string& id() const { return id_; }
  const std::string& type() const { return type_; }
  JobStatus status() const { return status_; }
  uint64_t current_progress() const { return progress_current_; }
  uint64_t total_progress() const { return progress_total_; }
  // The failure the job ended with (set once it is aborting), as query-jobs reports it.
  const std::optional<std::string>& error() const { return error_; }
  bool user_paused() const { return user_paused_; }
  // Cancel requested (soft or forced).
  bool cancel_requested() const { return cancelled_; }
  // QEMU's job_is_cancelled: a forced cancel; run() should stop at its next chance.
  bool is_cancelled() const { return cancelled_ && force_cancel_; }
  // query-jobs entry (JobInfo).
  nlohmann::json info() const;

 protected:
  // ---- what a concrete job implements ----
  // The work. Runs on the manager's loop after a first pause point; may co_await pause_point(),
  // yield() and the progress helpers. Its error aborts the job (message kept for query-jobs).
  virtual aio::Task<Result<void>> run() = 0;
  // Called once run() has succeeded and the job is being finalized; an error aborts the job.
  virtual Result<void> prepare() { return ok(); }
  // Exactly one of commit() (success) and abort() (failure or cancel) runs, then clean().
  virtual void commit() {}
  virtual void abort() {}
  virtual void clean() {}
  // job-complete in state ready. Jobs that never become ready keep the default.
  virtual bool supports_complete() const { return false; }
  virtual Result<void> complete() { return ok(); }
  // A cancel request: returns whether it is forced. Jobs without a soft cancel keep the default
  // (QEMU treats a driver without .cancel as always forced).
  virtual bool on_cancel(bool force) {
    (void)force;
    return true;
  }

  // ---- helpers for run() ----
  // Suspends while the job is paused (user or internal pause); status shows paused/standby.
  aio::Task<void> pause_point();
  // Suspends until the job is entered (cancel, complete, resume), then passes a pause point.
  // Returns at once when a forced cancel is pending.
  aio::Task<void> yield();
  void progress_set_remaining(uint64_t remaining) {
    progress_total_ = progress_current_ + remaining;
  }
  void progress_update(uint64_t done) { progress_current_ += done; }
  void progress_increase_remaining(uint64_t delta) { progress_total_ += delta; }
  // running -> ready (mirror-like jobs that wait for job-complete).
  void transition_to_ready();

 private:
  friend class JobManager;

  void enter();

  std::string id_;
  std::string type_;
  Flags flags_;
  JobManager* manager_ = nullptr;
  JobStatus status_ = JobStatus::kUndefined;
  bool started_ = false;
  // The coroutine has finished run() and the job is being completed on the loop.
  bool deferred_to_main_loop_ = false;
  bool busy_ = false;
  int pause_count_ = 1;  // created jobs are paused until started
  bool user_paused_ = false;
  bool cancelled_ = false;
  bool force_cancel_ = false;
  uint64_t progress_current_ = 0;
  uint64_t progress_total_ = 0;
  std::optional<Error> failure_;
  std::optional<std::string> error_;
  // Set while run() is suspended in yield() or a pause; enter() resumes it.
  aio::Event* wake_ = nullptr;
};

class JobManager {
 public:
  // `on_status_change` is called after every status change of a job (QEMU's JOB_STATUS_CHANGE).
  JobManager(aio::EventLoop& loop, std::function<void(const Job&)> on_status_change);
  ~JobManager();
  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  // Registers `job` (status created) after QEMU's job_create checks: "Invalid job ID '...'",
  // "Job ID '...' already in use".
  Result<Job*> create(std::unique_ptr<Job> job);
  // Starts a created job: status running, then run() is entered at once and runs until it first
  // suspends. A job that never suspends is completed (and, with auto-dismiss, destroyed) before
  // start() returns.
  void start(Job& job);
  // A job that was created but is not going to start (QEMU's job_early_fail): dismissed.
  void early_fail(Job& job);

  Job* find(std::string_view id) const;
  // Newest first, as query-jobs lists them.
  std::vector<Job*> jobs() const;

  // The QMP verbs, with QEMU's checks and messages.
  Result<void> user_pause(Job& job);
  Result<void> user_resume(Job& job);
  Result<void> user_cancel(Job& job, bool force);
  Result<void> user_complete(Job& job);
  Result<void> finalize(Job& job);
  Result<void> dismiss(Job& job);

  // Daemon shutdown: force-cancels every job and waits until their coroutines have finished and
  // they are concluded (jobs that need job-dismiss are dismissed).
  aio::Task<void> cancel_all();

 private:
  friend class Job;

  Result<void> apply_verb(const Job& job, JobVerb verb) const;
  void transition(Job& job, JobStatus to);
  aio::Task<void> run_job(Job* job);
  void completed(Job& job);
  void update_rc(Job& job);
  void do_finalize(Job& job);
  void finalize_single(Job& job);
  void conclude(Job& job);
  void do_dismiss(Job& job);
  void resume(Job& job);
  void cancel(Job& job, bool force);
  void cancel_async(Job& job, bool force);

  aio::EventLoop& loop_;
  std::function<void(const Job&)> on_status_change_;
  std::vector<std::unique_ptr<Job>> jobs_;  // oldest first
  aio::TaskGroup running_;
};

}  // namespace strata::block::job
