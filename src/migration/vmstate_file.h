#pragma once
// Saving RAM blocks to a file and restoring them from it (migrate "file:PATH,offset=N" and
// migrate-incoming from a file), plus describing and checking a saved file (strata vmstate
// info|verify). The layout is docs/migration-format.md; format.h encodes it.
//
// Threading contract: each function blocks the calling thread until the work is done. With
// multifd_channels = N > 0 it starts N worker threads, each with its own descriptor of the file,
// and joins them before returning, on success and on every error. Nothing is shared between calls,
// so several may run at once on different files. From an EventLoop, run them on the ThreadPool
// (`co_await pool.run([&] { return save_to_file(...); })`) and report progress through
// TransferOptions::progress / stop through TransferOptions::cancel.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "migration/format.h"
#include "migration/ram_block.h"

namespace strata::migration {

// Saves `blocks` to `path` (created when missing, never shrunk below options.offset). Saving
// again over a previous save reuses the same fixed offsets, so the file stays bounded by the RAM
// size; a page that has turned zero is marked absent in the new bitmap. Until the save completes
// the header at options.offset is zeroed, so an interrupted save is never loaded.
//
// Errors: kInvalidArgument for bad blocks or options; kUnsupported when direct-io is asked for and
// the file system refuses O_DIRECT ("Could not open 'PATH': filesystem does not support
// O_DIRECT", QEMU's text); kIo from the OS; kCancelled.
Result<TransferStats> save_to_file(std::span<const RamBlock> blocks, const std::string& path,
                                   const TransferOptions& options);

// Restores `blocks` from the stream at options.offset of `path` (its form, mapped-ram or
// streaming, comes from the file; options.mapped_ram is ignored). Every block of the file must be
// one of `blocks` with the same length and page size, and every one of `blocks` must be in the
// file.
//
// A mapped-ram file is validated completely (header, table, bitmaps, offsets against the file
// size, trailer sections and every checksum) before the first byte of `blocks` is written; pages
// absent from the bitmap are zero-filled. A streaming file is checked section by section as it is
// read, so on an error `blocks` may hold part of the stream. Either way the caller must treat the
// memory as undefined after an error.
Result<TransferStats> load_from_file(std::span<const RamBlock> blocks, const std::string& path,
                                     const TransferOptions& options);

struct SectionSummary {
  uint32_t type = 0;
  uint64_t offset = 0;  // absolute offset of the frame (0 in a streaming file: not tracked)
  uint64_t length = 0;  // payload bytes
};

struct FileDescription {
  FileHeader header;
  std::vector<BlockRecord> blocks;  // streaming form: offsets 0, present_pages counted
  std::vector<SectionSummary> sections;
  uint64_t file_size = 0;
};

// Reads and checks every structure and checksum of the stream at `offset` of `path` without a
// destination: for mapped-ram the header, table, bitmaps (present-page counts against the table)
// and trailer; for the streaming form every section, page data included. With `read_pages`, a
// mapped-ram file's present pages are read as well (I/O errors, holes punched past the end).
Result<FileDescription> describe_file(const std::string& path, uint64_t offset, bool read_pages);

}  // namespace strata::migration
