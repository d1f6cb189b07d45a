#pragma once
// Creating a host file for blockdev-create with driver `file` (file-posix's raw_co_create): the
// file is created if missing (never truncated by open), emptied, then grown to `size` with the
// requested preallocation. The open runs at once; the sizing is a coroutine whose data writes go
// through the event loop, as QEMU hands it to a worker thread.

#include <cstdint>
#include <optional>
#include <string>

#include "aio/event_loop.h"
#include "aio/task.h"
#include "base/result.h"

namespace strata::block::file {

struct FileCreateOptions {
  std::string filename;
  uint64_t size = 0;
  std::string preallocation = "off";  // off, falloc, full (metadata is refused, as by QEMU)
  bool nocow = false;
  std::optional<uint64_t> extent_size_hint;  // default 1 MiB, as QEMU's
};

// Two steps, as file-posix's create: the open runs at once in the caller (its failure is reported
// without the job ever suspending), the sizing always suspends first (QEMU's worker hand-off).
//
// Opens (creating) the file and applies nocow and the extent size hint; returns the descriptor.
// "Could not create '<name>': <strerror>".
Result<int> open_new_file(const FileCreateOptions& options);
// Empties the file, then grows it to options.size with the preallocation; always closes `fd`.
// Runs on `loop`. "Unsupported preallocation mode: <mode>", "Could not resize file: ...",
// "Could not preallocate data for the new file: ...", "Could not write zeros for
// preallocation: ...".
aio::Task<Result<void>> size_new_file(aio::EventLoop& loop, int fd, FileCreateOptions options);

}  // namespace strata::block::file
