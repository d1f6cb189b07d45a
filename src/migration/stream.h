#pragma once
// The streaming form of the migration stream over any byte channel (a socket for migrate
// "unix:"/"tcp:", a pipe, a file without mapped-ram): sequential RAM_PAGES sections carrying runs
// of data pages and runs of zero pages, checksummed section by section.
//
// Threading contract: like vmstate_file.h, the functions block the calling thread; the sink and
// source are used only from that thread.

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"
#include "migration/ram_block.h"

namespace strata::migration {

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  // Writes all of `data` or fails.
  virtual Result<void> write(std::span<const uint8_t> data) = 0;
};

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Fills all of `buffer` or fails; the end of the channel before that is a kCorrupt error
  // ("stream truncated").
  virtual Result<void> read(std::span<uint8_t> buffer) = 0;
};

// A descriptor as a sink or source (write(2)/read(2) from its current position, retrying short
// transfers and EINTR). Does not own the descriptor.
class FdSink : public ByteSink {
 public:
  explicit FdSink(int fd) : fd_(fd) {}
  Result<void> write(std::span<const uint8_t> data) override;

 private:
  int fd_;
};

class FdSource : public ByteSource {
 public:
  explicit FdSource(int fd) : fd_(fd) {}
  Result<void> read(std::span<uint8_t> buffer) override;

 private:
  int fd_;
};

// Writes the whole stream: header (base_offset as given), RAM_BLOCKS, the pages, END. Only
// options.progress and options.cancel are used. stats.bytes_io counts the bytes written.
Result<TransferStats> save_to_stream(std::span<const RamBlock> blocks, ByteSink& sink,
                                     uint64_t base_offset, const TransferOptions& options);

// Reads a whole stream into `blocks` (same matching rules as load_from_file); every page of every
// block must be covered by a data or zero run before END.
Result<TransferStats> load_from_stream(std::span<const RamBlock> blocks, ByteSource& source,
                                       const TransferOptions& options);

}  // namespace strata::migration
