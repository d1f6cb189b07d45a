#pragma once
// The daemon's run state (QEMU's RunState as query-status reports it) and the commands that change
// it: `stop` (running -> paused, STOP event), `cont` (activates every inactive block node first,
// as QEMU's qmp_cont does for late activation after a migration, then paused -> running, RESUME
// event) and `query-status`. A fresh daemon is running and owns its disks.

#include <string>

namespace strata::daemon {

class Daemon;

void register_run_state_commands(Daemon& daemon);

}  // namespace strata::daemon
