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
// auto-dismiss. Jobs started together by one `transaction` (completion-mode grouped) share a
// JobTxn: none goes pending before all are waiting, and one failure force-cancels the others
// and aborts them all (QEMU's JobTxn). A job created without a JobTxn is alone in its own.
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
class Job;

// block-job-change's options (QAPI BlockJobChangeOptions): what a job may change while it runs.
struct JobChange {
  // Mirror: the new copy mode ("background" when the command named another job type, as
  // QEMU reads its zeroed union member).
  std::string copy_mode = "background";
};

// Jobs that complete together (QEMU's JobTxn). Create one with JobManager::new_txn() and pass it
// to every JobManager::create() of the group.
struct JobTxn {
  std::vector<Job*> jobs;  // members not yet finalized, in creation order
  bool aborting = false;
};

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
  bool busy() const { return busy_; }
  // QEMU's pause_count > 0 (query-block-jobs `paused`).
  bool pause_requested() const { return pause_count_ > 0; }
  const Flags& flags() const { return flags_; }
  // Block jobs (query-block-jobs lists them, block-job-* commands reach them) override this.
  virtual bool is_block_job() const { return false; }
  // The manager's user_resume calls this first (QEMU's JobDriver.user_resume).
  virtual void on_user_resume() {}
  // block-job-set-speed / the speed argument: `speed` is >= 0 (the manager checked the verb and
  // the sign). Jobs without a speed limit keep the default.
  virtual void set_speed(uint64_t speed) { (void)speed; }
  // block-job-change, after the verb check (QEMU's JobDriver.change). Jobs without options to
  // change keep the default: QEMU's "Job type does not support change".
  virtual Result<void> change(const JobChange& options);

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
  // Called in pause_point() before the job parks and after it resumes (QEMU's JobDriver.pause and
  // .resume): a job stops its background work here so that it can park quickly.
  virtual void on_pause() {}
  virtual void on_resume() {}
  // Notifications for the QMP events of block jobs (QEMU's on_pending/on_ready/
  // on_finalize_cancelled/on_finalize_completed notifiers): pending with auto-finalize off, after
  // the transition to ready, and once commit/abort and clean have run for a started job
  // (`cancelled` is QEMU's job_is_cancelled).
  virtual void event_pending() {}
  virtual void event_ready() {}
  virtual void event_finalized(bool cancelled) { (void)cancelled; }

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
  // QEMU's job_pause_locked: one more internal pause; the job parks at its next pause point.
  void pause();
  // The error policy `stop` (QEMU's block_job_error_action): pauses the job as a user would, so
  // that job-resume / block-job-resume continues it. No-op when already user-paused.
  void pause_as_user();
  // The manager (for jobs that emit events through it).
  JobManager& manager() const { return *manager_; }
  // Wakes run() when it waits in yield() (QEMU's job_enter).
  void kick() { enter(); }

 private:
  friend class JobManager;

  void enter();

  std::string id_;
  std::string type_;
  Flags flags_;
  JobManager* manager_ = nullptr;
  JobStatus status_ = JobStatus::kUndefined;
  bool started_ = false;
  std::shared_ptr<JobTxn> txn_;
  // run() is parked in pause_point(); paused_from_ is the status it will return to.
  bool parked_ = false;
  JobStatus paused_from_ = JobStatus::kRunning;
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
  // "Job ID '...' already in use". `txn` groups it with other jobs (nullptr: a txn of its own).
  Result<Job*> create(std::unique_ptr<Job> job, std::shared_ptr<JobTxn> txn = nullptr);
  static std::shared_ptr<JobTxn> new_txn() { return std::make_shared<JobTxn>(); }
  // QMP events of jobs other than JOB_STATUS_CHANGE (BLOCK_JOB_*): delivered to `sink`, if set.
  using EventSink = std::function<void(std::string name, nlohmann::json data)>;
  void set_event_sink(EventSink sink) { event_sink_ = std::move(sink); }
  void emit_event(std::string name, nlohmann::json data) const {
    if (event_sink_) {
      event_sink_(std::move(name), std::move(data));
    }
  }
  // Starts a created job: status running, then run() is entered at once and runs until it first
  // suspends. A job that never suspends is completed (and, with auto-dismiss, destroyed) before
  // start() returns.
  // `drained`: start as QEMU does inside a drained section (backup): the job parks at its first
  // pause point and is resumed before start() returns, which shows as running, paused, running.
  void start(Job& job, bool drained = false);
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
  // block-job-set-speed: the set-speed verb check, then "Parameter 'speed' expects a non-negative
  // value" when negative.
  Result<void> set_speed(Job& job, int64_t speed);
  // block-job-change: the change verb check, then the job's change().
  Result<void> change(Job& job, const JobChange& options);

  // Daemon shutdown: force-cancels every job and waits until their coroutines have finished and
  // they are concluded (jobs that need job-dismiss are dismissed).
  aio::Task<void> cancel_all();

 private:
  friend class Job;

  Result<void> apply_verb(const Job& job, JobVerb verb) const;
  void transition(Job& job, JobStatus to);
  aio::Task<void> run_job(Job* job);
  void completed(Job& job);
  void txn_success(Job& job);
  void txn_abort(Job& job);
  // Finalizes the members of an aborting txn once none of them is still running.
  void finish_txn_abort(const std::shared_ptr<JobTxn>& txn);
  static bool is_completed(const Job& job);
  void update_rc(Job& job);
  void do_finalize(Job& job);
  void finalize_single(Job& job);
  void conclude(Job& job);
  void do_dismiss(Job& job);
  void resume(Job& job);
  void cancel(Job& job, bool force);
  void cancel_async(Job& job, bool force);

  [[maybe_unused]] aio::EventLoop& loop_;  // the loop jobs run on (kept for callers' clarity)
  std::function<void(const Job&)> on_status_change_;
  EventSink event_sink_;
  std::vector<std::unique_ptr<Job>> jobs_;  // oldest first
  aio::TaskGroup running_;
};

}  // namespace strata::block::job
