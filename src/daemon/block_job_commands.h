#pragma once
// query-block-jobs and the block-job-* commands.

#include <cstdint>
#include <memory>
#include <optional>

#include "base/result.h"
#include "block/job/block_job.h"

namespace strata::daemon {

class Daemon;

void register_block_job_commands(Daemon& daemon);

// The common end of commands that start a block job (block-stream, block-commit): registers the
// job `built` holds (or passes its error on), applies `speed` (a failure dismisses the job) and
// starts it.
Result<void> start_block_job(Daemon& daemon, Result<std::unique_ptr<block::job::BlockJob>> built,
                             std::optional<int64_t> speed);

}  // namespace strata::daemon
