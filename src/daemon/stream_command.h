#pragma once
// block-stream (QEMU's qmp_block_stream): argument checks with QEMU's messages, then a stream
// job (block/stream/stream_job.h) created and started.

namespace strata::daemon {

class Daemon;

// Registers block-stream.
void register_stream_command(Daemon& daemon);

}  // namespace strata::daemon
