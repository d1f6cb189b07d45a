#pragma once
// block-commit (QEMU's qmp_block_commit): QEMU's argument checks and messages, then a commit job
// for an intermediate top (block/commit/commit_job.h), or, when the top is the active layer (the
// device, or a node with a writer), a mirror of the top into the base that becomes READY and
// pivots at job-complete (block/mirror/mirror_job.h, QEMU's commit_active_start).

namespace strata::daemon {

class Daemon;

void register_commit_command(Daemon& daemon);

}  // namespace strata::daemon
