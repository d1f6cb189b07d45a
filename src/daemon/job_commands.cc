// QMP commands on jobs: query-jobs, job-pause, job-resume, job-cancel, job-complete,
// job-finalize, job-dismiss (QEMU's job-qmp.c), and blockdev-create, which starts a job.

#include "base/arg_decoder.h"
#include "daemon/blockdev_create.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

using Reply = aio::Task<Result<nlohmann::json>>;
using block::job::Job;
using block::job::JobManager;

// Decodes {"id": ...} and finds the job ("Job not found", as QEMU's find_job_locked).
Result<Job*> find_job(JobManager& jobs, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::string id = d.str("id");
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  Job* job = jobs.find(id);
  if (job == nullptr) {
    return make_error(ErrorKind::kNotFound, "Job not found");
  }
  return job;
}

Result<nlohmann::json> empty_or_error(Result<void> result) {
  if (!result) {
    return std::move(result).error();
  }
  return nlohmann::json::object();
}

}  // namespace

void Daemon::register_job_commands() {
  commands_.add("query-jobs", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    nlohmann::json list = nlohmann::json::array();
    for (const Job* job : jobs_.jobs()) {
      list.push_back(job->info());
    }
    co_return list;
  });

  // The verbs taking only {"id"}.
  using Verb = Result<void> (JobManager::*)(Job&);
  const std::pair<const char*, Verb> kVerbs[] = {
      {"job-pause", &JobManager::user_pause},       {"job-resume", &JobManager::user_resume},
      {"job-complete", &JobManager::user_complete}, {"job-finalize", &JobManager::finalize},
      {"job-dismiss", &JobManager::dismiss},
  };
  for (const auto& entry : kVerbs) {
    const Verb verb = entry.second;
    commands_.add(entry.first, [this, verb](const nlohmann::json& args, qmp::Monitor&) -> Reply {
      auto job = find_job(jobs_, args);
      if (!job) {
        co_return std::move(job).error();
      }
      co_return empty_or_error((jobs_.*verb)(**job));
    });
  }
  // job-cancel has no `force` (block-job-cancel has): a job-cancel is always forced.
  commands_.add("job-cancel", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    auto job = find_job(jobs_, args);
    if (!job) {
      co_return std::move(job).error();
    }
    co_return empty_or_error(jobs_.user_cancel(**job, true));
  });

  commands_.add("blockdev-create", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    auto made = make_blockdev_create_job(args, graph_);
    if (!made) {
      co_return std::move(made).error();
    }
    auto job = jobs_.create(std::move(made).value());
    if (!job) {
      co_return std::move(job).error();
    }
    jobs_.start(**job);
    co_return nlohmann::json::object();
  });
}

}  // namespace strata::daemon
