#pragma once
// blockdev-create (QEMU's qmp_blockdev_create and the drivers' bdrv_co_create): a "create" job
// that formats a new image. Drivers: `file` (creates the host file) and `qcow2` (formats an
// existing node given as `file`); every other driver name is refused with QEMU's "Driver does not
// support blockdev-create".

#include <memory>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "block/graph/graph.h"
#include "block/job/job.h"

namespace strata::daemon {

// Decodes blockdev-create's arguments and returns the (not yet registered) job. Argument errors
// are returned here (the command fails, no job); everything else fails the job. The job runs on
// the current event loop; `graph` must outlive it.
Result<std::unique_ptr<block::job::Job>> make_blockdev_create_job(const nlohmann::json& args,
                                                                  block::Graph& graph);

}  // namespace strata::daemon
