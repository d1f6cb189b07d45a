#pragma once
// query-block-jobs and the block-job-* commands.

#include <cstdint>
#include <memory>
#include <optional>

#include "base/result.h"
#include "block/graph/node.h"
#include "block/job/block_job.h"

namespace strata::daemon {

class Daemon;

void register_block_job_commands(Daemon& daemon);

// QEMU's bdrv_is_root_node: only users outside the graph (exports) use `node`; no parent node and
// no job (the commands that take a device answer "Need a root block node" otherwise).
bool is_root_node(const block::Node& node);

// QEMU's op blockers (block_job_add_bdrv): a node a block job works on cannot take part in
// another job ("Node 'x' is busy: block device is in use by block job: stream").
Result<void> check_not_in_block_job(const block::Node& node);

// The common end of commands that start a block job (block-stream, block-commit): registers the
// job `built` holds (or passes its error on), applies `speed` (a failure dismisses the job) and
// starts it.
Result<void> start_block_job(Daemon& daemon, Result<std::unique_ptr<block::job::BlockJob>> built,
                             std::optional<int64_t> speed);

}  // namespace strata::daemon
