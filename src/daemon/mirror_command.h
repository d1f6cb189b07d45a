#pragma once
// blockdev-mirror (QEMU's qmp_blockdev_mirror and blockdev_mirror_common): QEMU's argument checks
// and messages, then a mirror job (block/mirror/mirror_job.h).

namespace strata::daemon {

class Daemon;

void register_mirror_command(Daemon& daemon);

}  // namespace strata::daemon
