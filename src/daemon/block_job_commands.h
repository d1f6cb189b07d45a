#pragma once
// query-block-jobs and the block-job-* commands.

namespace strata::daemon {

class Daemon;

void register_block_job_commands(Daemon& daemon);

}  // namespace strata::daemon
