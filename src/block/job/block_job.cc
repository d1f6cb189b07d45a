#include "block/job/block_job.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>

#include "aio/event_loop.h"

namespace strata::block::job {

namespace {

constexpr std::array<std::string_view, 5> kOnErrorNames = {"report", "ignore", "enospc", "stop",
                                                           "auto"};

const char* action_name(ErrorAction action) {
  switch (action) {
    case ErrorAction::kReport:
      return "report";
    case ErrorAction::kIgnore:
      return "ignore";
    case ErrorAction::kStop:
      return "stop";
  }
  return "report";
}

}  // namespace

std::optional<OnError> parse_on_error(std::string_view name) {
  for (size_t i = 0; i < kOnErrorNames.size(); ++i) {
    if (kOnErrorNames[i] == name) {
      return static_cast<OnError>(i);
    }
  }
  return std::nullopt;
}

std::span<const std::string_view> on_error_names() {
  return kOnErrorNames;
}

BlockJob::BlockJob(std::string id, std::string type, Flags flags)
    : Job(std::move(id), std::move(type), flags) {}

void BlockJob::set_speed(uint64_t speed) {
  const uint64_t old_speed = speed_;
  speed_ = speed;
  rate_limit_.set_speed(speed);
  speed_changed();
  // As QEMU: a job sleeping for its old limit is woken when the limit is lifted or raised.
  if (speed == 0 || speed > old_speed) {
    kick();
  }
}

nlohmann::json BlockJob::block_info() const {
  nlohmann::json info = {
      {"type", type()},
      {"device", id()},
      {"len", total_progress()},
      {"offset", current_progress()},
      {"busy", busy()},
      {"paused", pause_requested()},
      {"speed", speed_},
      {"io-status", io_status_},
      {"ready", status() == JobStatus::kReady || status() == JobStatus::kStandby},
      {"status", std::string(status_name(status()))},
      {"auto-finalize", flags().auto_finalize},
      {"auto-dismiss", flags().auto_dismiss},
  };
  if (error()) {
    info["error"] = *error();
  }
  return info;
}

nlohmann::json BlockJob::event_payload() const {
  return {{"type", type()},
          {"device", id()},
          {"len", total_progress()},
          {"offset", current_progress()},
          {"speed", speed_}};
}

void BlockJob::event_pending() {
  manager().emit_event("BLOCK_JOB_PENDING", {{"type", type()}, {"id", id()}});
}

void BlockJob::event_ready() {
  manager().emit_event("BLOCK_JOB_READY", event_payload());
}

void BlockJob::event_finalized(bool cancelled) {
  if (cancelled) {
    manager().emit_event("BLOCK_JOB_CANCELLED", event_payload());
    return;
  }
  nlohmann::json data = event_payload();
  if (error()) {
    data["error"] = *error();
  }
  manager().emit_event("BLOCK_JOB_COMPLETED", std::move(data));
}

ErrorAction BlockJob::error_action(OnError policy, bool is_read, int error) {
  ErrorAction action = ErrorAction::kReport;
  switch (policy) {
    case OnError::kEnospc:
    case OnError::kAuto:
      action = error == ENOSPC ? ErrorAction::kStop : ErrorAction::kReport;
      break;
    case OnError::kStop:
      action = ErrorAction::kStop;
      break;
    case OnError::kReport:
      action = ErrorAction::kReport;
      break;
    case OnError::kIgnore:
      action = ErrorAction::kIgnore;
      break;
  }
  manager().emit_event("BLOCK_JOB_ERROR", {{"device", id()},
                                           {"operation", is_read ? "read" : "write"},
                                           {"action", action_name(action)}});
  if (action == ErrorAction::kStop) {
    pause_as_user();
    io_status_ = error == ENOSPC ? "nospace" : "failed";
  }
  return action;
}

aio::Task<void> BlockJob::rate_limit_sleep(uint64_t bytes) {
  // QEMU's job_sleep_ns slices: short sleeps keep pause and cancel prompt.
  constexpr uint64_t kMaxSleepNs = 100'000'000;
  if (bytes == 0) {
    co_return;
  }
  uint64_t delay = ratelimit_delay_ns(bytes);
  while (delay > 0 && !is_cancelled() && !pause_requested() && speed() != 0) {
    const uint64_t step = std::min(delay, kMaxSleepNs);
    co_await aio::EventLoop::current()->sleep_for(std::chrono::nanoseconds(step));
    delay -= step;
  }
}

}  // namespace strata::block::job
