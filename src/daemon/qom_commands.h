#pragma once
// qom-get and qom-set on user-created objects (QEMU's qom commands, for the properties strata's
// objects have): a throttle-group's `limits` (read and change) and its legacy x-* members (read
// only after creation). A path is the object's id or /objects/ID.

namespace strata::daemon {

class Daemon;

void register_qom_commands(Daemon& daemon);

}  // namespace strata::daemon
