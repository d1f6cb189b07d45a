#pragma once
// Block jobs (QEMU's blockjob.c): jobs that copy data between nodes and are visible to
// query-block-jobs and the block-job-* commands. On top of Job they add a speed limit, the
// io-status, the on-source-error / on-target-error policies with BLOCK_JOB_ERROR, and the
// BLOCK_JOB_COMPLETED / CANCELLED / READY / PENDING events, emitted through the JobManager's
// event sink in QEMU's order (see Job's event_* hooks).

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "block/job/job.h"
#include "block/job/rate_limit.h"

namespace strata::block::job {

// QAPI BlockdevOnError.
enum class OnError { kReport, kIgnore, kEnospc, kStop, kAuto };
// QAPI BlockErrorAction.
enum class ErrorAction { kReport, kIgnore, kStop };

// Parses a BlockdevOnError name ("report", ...); nullopt for anything else.
std::optional<OnError> parse_on_error(std::string_view name);
// The member names of BlockdevOnError, for ArgDecoder::opt_enum.
std::span<const std::string_view> on_error_names();

class BlockJob : public Job {
 public:
  BlockJob(std::string id, std::string type, Flags flags);

  bool is_block_job() const override { return true; }
  uint64_t speed() const { return speed_; }
  void set_speed(uint64_t speed) override;
  // query-block-jobs entry (BlockJobInfo).
  virtual nlohmann::json block_info() const;

  // QEMU's block_job_error_action: the action `policy` takes for `error` (an errno), with the
  // BLOCK_JOB_ERROR event; `stop` pauses the job as a user pause and sets io-status.
  ErrorAction error_action(OnError policy, bool is_read, int error);

 protected:
  // A speed change reaches the job's copy engine (backup: block-copy's rate limit).
  virtual void speed_changed() {}
  // Time to wait before copying `bytes` more under the job's own limit (QEMU's
  // block_job_ratelimit_processed_bytes + sleep); 0 without a limit.
  uint64_t ratelimit_delay_ns(uint64_t bytes) { return rate_limit_.delay_ns(bytes); }
  // Accounts `bytes` just copied and sleeps as long as the speed limit asks; a pause, a cancel
  // or a change to unlimited (block-job-set-speed 0) ends the sleep early (stream, commit).
  aio::Task<void> rate_limit_sleep(uint64_t bytes);

  void on_user_resume() override { io_status_ = "ok"; }
  void event_pending() override;
  void event_ready() override;
  void event_finalized(bool cancelled) override;

 private:
  // {type, device, len, offset, speed}: the common payload of COMPLETED/CANCELLED/READY.
  nlohmann::json event_payload() const;

  uint64_t speed_ = 0;
  RateLimit rate_limit_;
  std::string io_status_ = "ok";  // ok | failed | nospace
};

}  // namespace strata::block::job
