#pragma once
// Pieces shared by the savers and loaders of migration/: descriptors and positional I/O, the
// zero-page check, the multifd worker pool, progress reporting and matching a stream's blocks to
// the destination's. Not part of the component's interface.

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "migration/format.h"
#include "migration/ram_block.h"
#include "migration/stream.h"
#include "migration/vmstate_file.h"

namespace strata::migration::internal {

// Owns one descriptor; closes it on destruction.
class OwnedFd {
 public:
  OwnedFd() = default;
  explicit OwnedFd(int fd) : fd_(fd) {}
  OwnedFd(OwnedFd&& other) noexcept : fd_(other.release()) {}
  OwnedFd& operator=(OwnedFd&& other) noexcept;
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  ~OwnedFd();

  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

// open(2) with O_CLOEXEC. When `flags` has O_DIRECT and the file system refuses it, fails with
// kUnsupported and QEMU's text "Could not open 'PATH': filesystem does not support O_DIRECT".
Result<OwnedFd> open_file(const std::string& path, int flags, mode_t mode = 0600);

// Positional I/O of exactly `length` bytes, retrying short transfers and EINTR. A read that meets
// the end of the file fails with kCorrupt ("file truncated").
Result<void> pwrite_all(int fd, const uint8_t* data, uint64_t length, uint64_t offset);
Result<void> pread_all(int fd, uint8_t* data, uint64_t length, uint64_t offset);
Result<uint64_t> file_size(int fd);

// True when the page's `size` bytes are all zero; stops at the first non-zero 64-byte line.
bool is_zero_page(const uint8_t* page, size_t size);

inline bool bitmap_test(std::span<const uint8_t> bitmap, uint64_t page) {
  return (bitmap[page / 8] >> (page % 8) & 1) != 0;
}
inline void bitmap_set(std::span<uint8_t> bitmap, uint64_t page) {
  bitmap[page / 8] = static_cast<uint8_t>(bitmap[page / 8] | (1u << (page % 8)));
}
uint64_t bitmap_count(std::span<const uint8_t> bitmap);

// A piece of one block that one worker handles at a time. Pieces start at multiples of 64 pages,
// so workers never share a bitmap word.
struct Chunk {
  size_t block = 0;
  uint64_t first_page = 0;
  uint64_t page_count = 0;
};
inline constexpr uint64_t kChunkBytes = 8u << 20;
std::vector<Chunk> split_into_chunks(std::span<const BlockRecord> blocks);

// Runs work(channel, item) for every item in [0, items): with channels > 0 on that many threads
// (channel = the thread's index), taking items in order from a shared counter; with 0 on the
// calling thread (channel 0). After the first error no new item starts; that error is returned
// once every thread has stopped.
Result<void> run_on_channels(unsigned channels, uint64_t items,
                             const std::function<Result<void>(unsigned, uint64_t)>& work);

// Counts bytes of RAM done and calls the user's progress callback, one call at a time.
class Progress {
 public:
  Progress(const TransferOptions& options, uint64_t total) : options_(options), total_(total) {}
  // Any thread.
  void add(uint64_t bytes);
  // kCancelled once options.cancel is set.
  Result<void> check_cancelled() const;

 private:
  const TransferOptions& options_;
  uint64_t total_;
  std::mutex mutex_;
  uint64_t done_ = 0;  // guarded by mutex_
};

// For each of the stream's blocks, the index of the destination block with its name. Fails on a
// block the destination lacks ("unknown RAM block"), a length or page size mismatch, or a
// destination block the stream lacks.
Result<std::vector<size_t>> match_blocks(std::span<const BlockRecord> stream_blocks,
                                         std::span<const RamBlock> destination);

// Checks the blocks' shapes and the options' combination (QEMU's rules: multifd needs mapped-ram,
// direct-io needs both and page-aligned memory).
Result<void> check_transfer_options(std::span<const RamBlock> blocks,
                                    const TransferOptions& options);

// The mapped-ram metadata of a file, read and checked in full (format.h check_* and every
// checksum, bitmap counts against the table, trailer sections up to END).
struct MappedRamMetadata {
  FileHeader header;
  std::vector<BlockRecord> blocks;
  std::vector<std::vector<uint8_t>> bitmaps;  // one per block, bitmap_size bytes
  std::vector<SectionSummary> sections;       // RAM_BLOCKS, the trailer sections, END
  uint64_t file_size = 0;
  uint64_t metadata_bytes = 0;  // bytes read to learn all this
};
Result<MappedRamMetadata> read_mapped_ram_metadata(int fd, const FileHeader& header,
                                                   uint64_t file_size);

// Reads the header at `offset` of the file (up to kMaxHeaderSize bytes) and checks that it was
// written for that offset.
Result<FileHeader> read_file_header(int fd, uint64_t offset, uint64_t file_size);

// What reading a streaming-form stream found.
struct StreamContents {
  FileHeader header;
  std::vector<BlockRecord> blocks;  // present_pages counted from the data runs
  std::vector<SectionSummary> sections;
  uint64_t bytes_read = 0;
};

// Reads a whole streaming-form stream from `source`. With a destination, pages land in it (see
// load_from_stream); with an empty one, every section is read and checked into a scratch buffer.
Result<StreamContents> read_stream(ByteSource& source, std::span<const RamBlock> destination,
                                   const TransferOptions& options);

}  // namespace strata::migration::internal
