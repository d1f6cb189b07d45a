#pragma once
// block-commit (QEMU's qmp_block_commit) for an intermediate top: QEMU's argument checks and
// messages, then a commit job (block/commit/commit_job.h). Committing the active layer (top is
// the device, or has a writer) is refused: that mirror-based job is not built.

namespace strata::daemon {

class Daemon;

void register_commit_command(Daemon& daemon);

}  // namespace strata::daemon
