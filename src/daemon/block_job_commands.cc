// The legacy block-job-* commands (QEMU's blockdev.c qmp_block_job_*) and query-block-jobs: they
// reach block jobs only (a `create` job is "not found"), by {device} (= job id) or, for
// finalize/dismiss, {id}.

#include "daemon/block_job_commands.h"

#include <array>
#include <string_view>

#include "base/arg_decoder.h"
#include "block/job/block_job.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

using Reply = aio::Task<Result<nlohmann::json>>;
using block::job::BlockJob;
using block::job::Job;
using block::job::JobManager;

// QEMU's find_block_job_locked: DeviceNotActive "Block job 'x' not found".
Result<BlockJob*> find_block_job(JobManager& jobs, const std::string& id) {
  Job* job = jobs.find(id);
  if (job == nullptr || !job->is_block_job()) {
    return make_error(ErrorKind::kNotFound, "Block job '" + id + "' not found")
        .with_qmp_class("DeviceNotActive");
  }
  return static_cast<BlockJob*>(job);
}

Result<nlohmann::json> empty_or_error(Result<void> result) {
  if (!result) {
    return std::move(result).error();
  }
  return nlohmann::json::object();
}

}  // namespace

void register_block_job_commands(Daemon& daemon) {
  qmp::CommandTable& commands = daemon.command_table();
  JobManager& jobs = daemon.jobs();

  commands.add("query-block-jobs", [&jobs](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    nlohmann::json list = nlohmann::json::array();
    for (const Job* job : jobs.jobs()) {
      if (job->is_block_job()) {
        list.push_back(static_cast<const BlockJob*>(job)->block_info());
      }
    }
    co_return list;
  });

  // The verbs that take {device} (or {id}) and nothing else.
  struct Verb {
    const char* name;
    const char* key;
    Result<void> (JobManager::*apply)(Job&);
  };
  const Verb kVerbs[] = {
      {"block-job-pause", "device", &JobManager::user_pause},
      {"block-job-resume", "device", &JobManager::user_resume},
      {"block-job-complete", "device", &JobManager::user_complete},
      {"block-job-finalize", "id", &JobManager::finalize},
      {"block-job-dismiss", "id", &JobManager::dismiss},
  };
  for (const Verb& verb : kVerbs) {
    commands.add(verb.name, [&jobs, verb](const nlohmann::json& args, qmp::Monitor&) -> Reply {
      ArgDecoder d(args);
      std::string id = d.str(verb.key);
      auto decoded = d.finish();
      if (!decoded) {
        co_return std::move(decoded).error();
      }
      auto job = find_block_job(jobs, id);
      if (!job) {
        co_return std::move(job).error();
      }
      co_return empty_or_error((jobs.*verb.apply)(**job));
    });
  }

  commands.add("block-job-cancel", [&jobs](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    std::string device = d.str("device");
    bool force = d.opt_bool("force").value_or(false);
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    auto job = find_block_job(jobs, device);
    if (!job) {
      co_return std::move(job).error();
    }
    if ((*job)->user_paused() && !force) {
      co_return make_error(ErrorKind::kInvalidArgument,
                           "The block job for device '" + device + "' is currently paused");
    }
    co_return empty_or_error(jobs.user_cancel(**job, force));
  });

  commands.add("block-job-change", [&jobs](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    static constexpr std::array<std::string_view, 9> kJobTypes = {
        "commit", "stream",        "mirror",        "backup",         "create",
        "amend",  "snapshot-load", "snapshot-save", "snapshot-delete"};
    static constexpr std::array<std::string_view, 2> kCopyModes = {"background", "write-blocking"};
    ArgDecoder d(args);
    std::string id = d.str("id");
    std::string type = d.enumeration("type", kJobTypes);
    block::job::JobChange change;
    if (type == "mirror") {
      change.copy_mode = d.enumeration("copy-mode", kCopyModes);
    }
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    auto job = find_block_job(jobs, id);
    if (!job) {
      co_return std::move(job).error();
    }
    co_return empty_or_error(jobs.change(**job, change));
  });

  commands.add("block-job-set-speed", [&jobs](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    std::string device = d.str("device");
    int64_t speed = d.i64("speed");
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    auto job = find_block_job(jobs, device);
    if (!job) {
      co_return std::move(job).error();
    }
    co_return empty_or_error(jobs.set_speed(**job, speed));
  });
}

bool is_root_node(const block::Node& node) {
  for (const block::Child* parent : node.parents()) {
    if (parent->parent_node() != nullptr || parent->parent()->stays_at_node()) {
      return false;
    }
  }
  return true;
}

Result<void> check_not_in_block_job(const block::Node& node) {
  for (const block::Child* parent : node.parents()) {
    if (const auto* job = dynamic_cast<const BlockJob*>(parent->parent()); job != nullptr) {
      return make_error(ErrorKind::kBusy,
                        "Node '" + node.name() +
                            "' is busy: block device is in use by block job: " + job->type());
    }
  }
  return ok();
}

Result<void> start_block_job(Daemon& daemon, Result<std::unique_ptr<block::job::BlockJob>> built,
                             std::optional<int64_t> speed) {
  if (!built) {
    return std::move(built).error();
  }
  block::job::JobManager& jobs = daemon.jobs();
  auto created = jobs.create(std::move(built).value());
  if (!created) {
    return std::move(created).error();
  }
  if (speed) {
    auto speed_set = jobs.set_speed(**created, *speed);
    if (!speed_set) {
      jobs.early_fail(**created);
      return std::move(speed_set).error();
    }
  }
  jobs.start(**created);
  return ok();
}

}  // namespace strata::daemon
