#include "block/job/job.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace strata::block::job {

namespace {

constexpr size_t kStatusCount = 11;
constexpr size_t kVerbCount = 8;

constexpr std::array<std::string_view, kStatusCount> kStatusNames = {
    "undefined", "created", "running",  "paused",    "ready", "standby",
    "waiting",   "pending", "aborting", "concluded", "null",
};
constexpr std::array<std::string_view, kVerbCount> kVerbNames = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss", "change",
};

// QEMU's JobSTT: row = from, column = to (U, C, R, P, Y, S, W, D, X, E, N).
constexpr bool kTransitions[kStatusCount][kStatusCount] = {
    /* U */ {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    /* C */ {0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1},
    /* R */ {0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0},
    /* P */ {0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
    /* Y */ {0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0},
    /* S */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* W */ {0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    /* D */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* X */ {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    /* E */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
    /* N */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};

// QEMU's JobVerbTable: row = verb, column = status.
constexpr bool kVerbs[kVerbCount][kStatusCount] = {
    /* cancel    */ {0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
    /* pause     */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* resume    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* set-speed */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    /* complete  */ {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    /* finalize  */ {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
    /* dismiss   */ {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
    /* change    */ {0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
};

size_t index_of(JobStatus status) {
  return static_cast<size_t>(status);
}

bool is_alpha(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

}  // namespace

std::string_view status_name(JobStatus status) {
  return kStatusNames[index_of(status)];
}

std::string_view verb_name(JobVerb verb) {
  return kVerbNames[static_cast<size_t>(verb)];
}

bool transition_allowed(JobStatus from, JobStatus to) {
  return kTransitions[index_of(from)][index_of(to)];
}

bool verb_allowed(JobVerb verb, JobStatus status) {
  return kVerbs[static_cast<size_t>(verb)][index_of(status)];
}

bool id_wellformed(std::string_view id) {
  if (id.empty() || !is_alpha(id[0])) {
    return false;
  }
  return std::all_of(id.begin() + 1, id.end(), [](char c) {
    return is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_';
  });
}

// ---- Job --------------------------------------------------------------------------------------

Job::Job(std::string id, std::string type, Flags flags)
    : id_(std::move(id)), type_(std::move(type)), flags_(flags) {}

nlohmann::json Job::info() const {
  nlohmann::json info = {
      {"id", id_},
      {"type", type_},
      {"status", std::string(status_name(status_))},
      {"current-progress", progress_current_},
      {"total-progress", progress_total_},
  };
  if (error_) {
    info["error"] = *error_;
  }
  return info;
}

void Job::enter() {
  if (wake_ != nullptr) {
    wake_->set();
  }
}

aio::Task<void> Job::pause_point() {
  if (pause_count_ <= 0 || is_cancelled()) {
    co_return;
  }
  on_pause();
  if (pause_count_ > 0 && !is_cancelled()) {
    paused_from_ = status_;
    manager_->transition(
        *this, paused_from_ == JobStatus::kReady ? JobStatus::kStandby : JobStatus::kPaused);
    parked_ = true;
    aio::Event wake;
    wake_ = &wake;
    busy_ = false;
    while (parked_ && pause_count_ > 0 && !is_cancelled()) {
      wake.reset();
      co_await wake.wait();
    }
    wake_ = nullptr;
    busy_ = true;
    // A resume has already restored the status (so that it shows before the command's reply);
    // a cancel has not.
    if (parked_) {
      parked_ = false;
      manager_->transition(*this, paused_from_);
    }
  }
  on_resume();
}

aio::Task<void> Job::yield() {
  if (is_cancelled()) {
    co_return;
  }
  if (pause_count_ <= 0) {
    aio::Event wake;
    wake_ = &wake;
    busy_ = false;
    co_await wake.wait();
    wake_ = nullptr;
    busy_ = true;
  }
  co_await pause_point();
}

void Job::transition_to_ready() {
  manager_->transition(*this, JobStatus::kReady);
  event_ready();
}

void Job::pause() {
  pause_count_++;
  enter();
}

void Job::pause_as_user() {
  if (!user_paused_) {
    pause();
    user_paused_ = true;
  }
}

// ---- JobManager -------------------------------------------------------------------------------

JobManager::JobManager(aio::EventLoop& loop, std::function<void(const Job&)> on_status_change)
    : loop_(loop), on_status_change_(std::move(on_status_change)) {}

JobManager::~JobManager() = default;

void JobManager::transition(Job& job, JobStatus to) {
  const JobStatus from = job.status_;
  if (!transition_allowed(from, to)) {
    std::fprintf(stderr, "job '%s': illegal transition %s -> %s\n", job.id_.c_str(),
                 std::string(status_name(from)).c_str(), std::string(status_name(to)).c_str());
    std::abort();
  }
  job.status_ = to;
  if (from != to && on_status_change_) {
    on_status_change_(job);
  }
}

Result<void> JobManager::apply_verb(const Job& job, JobVerb verb) const {
  if (verb_allowed(verb, job.status_)) {
    return ok();
  }
  return make_error(ErrorKind::kInvalidArgument,
                    "Job '" + job.id_ + "' in state '" + std::string(status_name(job.status_)) +
                        "' cannot accept command verb '" + std::string(verb_name(verb)) + "'");
}

Result<Job*> JobManager::create(std::unique_ptr<Job> job, std::shared_ptr<JobTxn> txn) {
  if (!id_wellformed(job->id_)) {
    return make_error(ErrorKind::kInvalidArgument, "Invalid job ID '" + job->id_ + "'");
  }
  if (find(job->id_) != nullptr) {
    return make_error(ErrorKind::kExists, "Job ID '" + job->id_ + "' already in use");
  }
  job->manager_ = this;
  job->txn_ = txn ? std::move(txn) : new_txn();
  job->txn_->jobs.push_back(job.get());
  Job* created = job.get();
  jobs_.push_back(std::move(job));
  transition(*created, JobStatus::kCreated);
  return created;
}

void JobManager::start(Job& job, bool drained) {
  job.started_ = true;
  if (!drained) {
    job.pause_count_--;
  }
  job.busy_ = true;
  transition(job, JobStatus::kRunning);
  running_.spawn(run_job(&job));
  if (drained) {
    resume(job);
  }
}

void JobManager::early_fail(Job& job) {
  do_dismiss(job);
}

aio::Task<void> JobManager::run_job(Job* job) {
  // As QEMU's job_start, run() is entered at once and runs until it first suspends; a job that
  // finishes without suspending completes before start() returns (QEMU's job_exit bottom half
  // runs before the QMP reply is sent), one that suspends completes later.
  co_await job->pause_point();
  Result<void> result = co_await job->run();
  if (!result && !job->failure_) {
    job->failure_ = std::move(result).error();
  }
  job->deferred_to_main_loop_ = true;
  job->busy_ = false;
  // May destroy *job (auto-dismiss); nothing touches it afterwards.
  completed(*job);
}

Job* JobManager::find(std::string_view id) const {
  for (const auto& job : jobs_) {
    if (job->id_ == id) {
      return job.get();
    }
  }
  return nullptr;
}

std::vector<Job*> JobManager::jobs() const {
  std::vector<Job*> list;
  for (auto it = jobs_.rbegin(); it != jobs_.rend(); ++it) {
    list.push_back(it->get());
  }
  return list;
}

void JobManager::update_rc(Job& job) {
  if (!job.failure_ && job.is_cancelled()) {
    job.failure_ = Error::from_errno(ECANCELED, "");
  }
  if (job.failure_) {
    job.error_ = job.failure_->message();
    transition(job, JobStatus::kAborting);
  }
}

bool JobManager::is_completed(const Job& job) {
  switch (job.status_) {
    case JobStatus::kWaiting:
    case JobStatus::kPending:
    case JobStatus::kAborting:
    case JobStatus::kConcluded:
    case JobStatus::kNull:
      return true;
    default:
      return false;
  }
}

void JobManager::completed(Job& job) {
  update_rc(job);
  if (job.failure_) {
    txn_abort(job);
  } else {
    txn_success(job);
  }
}

// QEMU's job_completed_txn_success_locked: waiting until every member has completed, then all
// pending together, then finalized unless one of them waits for job-finalize.
void JobManager::txn_success(Job& job) {
  transition(job, JobStatus::kWaiting);
  std::shared_ptr<JobTxn> txn = job.txn_;
  for (Job* other : txn->jobs) {
    if (!is_completed(*other)) {
      return;
    }
  }
  bool needs_finalize = false;
  for (Job* other : txn->jobs) {
    transition(*other, JobStatus::kPending);
    if (!other->flags_.auto_finalize) {
      other->event_pending();
      needs_finalize = true;
    }
  }
  if (!needs_finalize) {
    do_finalize(job);
  }
}

// QEMU's job_completed_txn_abort_locked. QEMU waits for the force-cancelled members in a nested
// event loop; here each of them finishes its coroutine and comes back through completed(), and
// the txn is finalized (in member order) once the last one has.
void JobManager::txn_abort(Job& job) {
  std::shared_ptr<JobTxn> txn = job.txn_;
  if (txn->aborting) {
    finish_txn_abort(txn);
    return;
  }
  txn->aborting = true;
  for (Job* other : std::vector<Job*>(txn->jobs)) {
    if (other != &job) {
      cancel_async(*other, true);
      if (!other->started_) {
        update_rc(*other);
      } else if (!other->deferred_to_main_loop_) {
        other->enter();
      }
    }
  }
  finish_txn_abort(txn);
}

void JobManager::finish_txn_abort(const std::shared_ptr<JobTxn>& txn) {
  for (Job* other : txn->jobs) {
    if (other->started_ && !other->deferred_to_main_loop_) {
      return;  // still running; its completion comes back here
    }
  }
  for (Job* other : std::vector<Job*>(txn->jobs)) {
    if (!is_completed(*other)) {
      update_rc(*other);
    }
    finalize_single(*other);
  }
}

void JobManager::do_finalize(Job& job) {
  std::shared_ptr<JobTxn> txn = job.txn_;
  // QEMU's job_prepare_locked over the txn: the first failure aborts them all.
  for (Job* other : txn->jobs) {
    if (!other->failure_) {
      Result<void> prepared = other->prepare();
      if (!prepared) {
        other->failure_ = std::move(prepared).error();
      }
      update_rc(*other);
    }
    if (other->failure_) {
      txn_abort(*other);
      return;
    }
  }
  for (Job* other : std::vector<Job*>(txn->jobs)) {
    finalize_single(*other);
  }
}

void JobManager::finalize_single(Job& job) {
  update_rc(job);
  if (!job.failure_) {
    job.commit();
  } else {
    job.abort();
  }
  job.clean();
  if (job.started_) {
    job.event_finalized(job.is_cancelled());
  }
  auto& members = job.txn_->jobs;
  members.erase(std::remove(members.begin(), members.end(), &job), members.end());
  conclude(job);
}

void JobManager::conclude(Job& job) {
  transition(job, JobStatus::kConcluded);
  if (job.flags_.auto_dismiss || !job.started_) {
    do_dismiss(job);
  }
}

void JobManager::do_dismiss(Job& job) {
  job.busy_ = false;
  job.deferred_to_main_loop_ = true;
  if (job.txn_) {
    auto& members = job.txn_->jobs;
    members.erase(std::remove(members.begin(), members.end(), &job), members.end());
  }
  transition(job, JobStatus::kNull);
  auto it = std::find_if(jobs_.begin(), jobs_.end(),
                         [&](const std::unique_ptr<Job>& entry) { return entry.get() == &job; });
  if (it != jobs_.end()) {
    jobs_.erase(it);
  }
}

void JobManager::resume(Job& job) {
  job.pause_count_--;
  if (job.pause_count_ == 0) {
    // As QEMU's job_enter, which runs the coroutine at once: the status is back before the
    // command that resumed the job replies.
    if (job.parked_) {
      job.parked_ = false;
      transition(job, job.paused_from_);
    }
    job.enter();
  }
}

Result<void> Job::change(const JobChange& options) {
  (void)options;
  return make_error(ErrorKind::kInvalidArgument, "Job type does not support change");
}

Result<void> JobManager::change(Job& job, const JobChange& options) {
  auto allowed = apply_verb(job, JobVerb::kChange);
  if (!allowed) {
    return allowed;
  }
  return job.change(options);
}

Result<void> JobManager::user_pause(Job& job) {
  auto allowed = apply_verb(job, JobVerb::kPause);
  if (!allowed) {
    return allowed;
  }
  if (job.user_paused_) {
    return make_error(ErrorKind::kInvalidArgument, "Job is already paused");
  }
  job.user_paused_ = true;
  job.pause_count_++;
  // A job waiting in yield() is entered so that it reaches its pause point (QEMU's job_pause).
  job.enter();
  return ok();
}

Result<void> JobManager::user_resume(Job& job) {
  if (!job.user_paused_ || job.pause_count_ <= 0) {
    return make_error(ErrorKind::kInvalidArgument, "Can't resume a job that was not paused");
  }
  auto allowed = apply_verb(job, JobVerb::kResume);
  if (!allowed) {
    return allowed;
  }
  job.on_user_resume();
  job.user_paused_ = false;
  resume(job);
  return ok();
}

void JobManager::cancel_async(Job& job, bool force) {
  force = job.on_cancel(force);
  if (job.user_paused_) {
    job.on_user_resume();
    job.user_paused_ = false;
    job.pause_count_--;
  }
  // A soft cancel of a job that has already finished its work is ignored.
  if (force || !job.deferred_to_main_loop_) {
    job.cancelled_ = true;
    job.force_cancel_ = job.force_cancel_ || force;
  }
}

void JobManager::cancel(Job& job, bool force) {
  if (job.status_ == JobStatus::kConcluded) {
    do_dismiss(job);
    return;
  }
  cancel_async(job, force);
  if (!job.started_) {
    completed(job);
  } else if (job.deferred_to_main_loop_) {
    if (job.is_cancelled()) {
      txn_abort(job);
    }
  } else {
    job.enter();
  }
}

Result<void> JobManager::user_cancel(Job& job, bool force) {
  auto allowed = apply_verb(job, JobVerb::kCancel);
  if (!allowed) {
    return allowed;
  }
  cancel(job, force);
  return ok();
}

Result<void> JobManager::user_complete(Job& job) {
  auto allowed = apply_verb(job, JobVerb::kComplete);
  if (!allowed) {
    return allowed;
  }
  if (job.pause_count_ > 0 || job.cancel_requested() || !job.supports_complete()) {
    return make_error(ErrorKind::kInvalidArgument,
                      "The active block job '" + job.id_ + "' cannot be completed");
  }
  auto completed_request = job.complete();
  if (completed_request) {
    job.enter();
  }
  return completed_request;
}

Result<void> JobManager::finalize(Job& job) {
  auto allowed = apply_verb(job, JobVerb::kFinalize);
  if (!allowed) {
    return allowed;
  }
  do_finalize(job);
  return ok();
}

Result<void> JobManager::set_speed(Job& job, int64_t speed) {
  auto allowed = apply_verb(job, JobVerb::kSetSpeed);
  if (!allowed) {
    return allowed;
  }
  if (speed < 0) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Parameter 'speed' expects a non-negative value");
  }
  job.set_speed(static_cast<uint64_t>(speed));
  return ok();
}

Result<void> JobManager::dismiss(Job& job) {
  auto allowed = apply_verb(job, JobVerb::kDismiss);
  if (!allowed) {
    return allowed;
  }
  do_dismiss(job);
  return ok();
}

aio::Task<void> JobManager::cancel_all() {
  // Each pass cancels what is unfinished and dismisses what is concluded; once the coroutines
  // are done every job is concluded (or gone), so the second pass empties the list.
  while (!jobs_.empty()) {
    for (Job* job : jobs()) {
      if (job->status_ == JobStatus::kConcluded) {
        do_dismiss(*job);
      } else {
        cancel(*job, true);
      }
    }
    co_await running_.wait();
  }
}

}  // namespace strata::block::job
