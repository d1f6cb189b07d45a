#pragma once
// What the migration core saves and restores: RAM blocks, each a named region of the caller's
// memory (an mmap'd memory-backend file, a memfd, anonymous memory), and the options and
// statistics of a save or a restore.

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "migration/format.h"

namespace strata::migration {

// A region of memory that holds one RAM block. The memory belongs to the caller and must stay
// mapped (and, for a restore, writable) until the save or restore returns. A save reads it while
// the caller keeps it unchanged (the guest is stopped); mapped-ram stores each page once, so a
// page changed during the save is saved in either version.
struct RamBlock {
  std::string name;
  uint8_t* host = nullptr;
  uint64_t length = 0;  // bytes, a non-zero multiple of page_size
  uint32_t page_size = kMinPageSize;
};

std::vector<BlockShape> shapes_of(std::span<const RamBlock> blocks);

// Called from whichever thread finished a piece of work (a multifd worker or the caller), never
// concurrently for one operation; `done` counts bytes of RAM handled so far (saved, skipped as
// zero, or restored), `total` is the RAM size. Keep it short: workers wait for it.
using ProgressCallback = std::function<void(uint64_t done, uint64_t total)>;

struct TransferOptions {
  // Lay pages out at fixed offsets (files only). Off: the streaming form.
  bool mapped_ram = true;
  // multifd-channels: worker threads, each with its own descriptor of the file, moving pages in
  // parallel. 0: the calling thread moves the pages through the main descriptor (no multifd).
  // Needs mapped_ram.
  unsigned multifd_channels = 0;
  // The workers' descriptors are opened O_DIRECT (the main channel, which writes the small
  // unaligned records, stays buffered). Needs mapped_ram and multifd_channels > 0, and RAM blocks
  // whose memory is page-aligned.
  bool direct_io = false;
  // Absolute offset of the stream in the file (migrate's file:PATH,offset=N); bytes before it are
  // left alone.
  uint64_t offset = 0;
  // Save only: make the file durable (fdatasync) before and after writing its header, so a file
  // with a valid header is always a complete one.
  bool sync = true;
  ProgressCallback progress;
  // Polled between pieces of work (each at most a few MiB); once true, the operation stops with
  // a kCancelled error. May be null.
  const std::atomic<bool>* cancel = nullptr;
};

struct TransferStats {
  uint64_t ram_total = 0;      // bytes of RAM covered
  uint64_t pages_total = 0;    // pages in all blocks
  uint64_t pages_present = 0;  // pages stored with their data (the rest are zero)
  uint64_t bytes_io = 0;       // bytes written (save) or read (restore), metadata included
  uint64_t file_size = 0;      // save to a file: the file's size afterwards
};

}  // namespace strata::migration
