// `strata img convert` to raw and qcow2: qemu-img convert's chunking (block status of the source,
// at most 2 MiB per request), sparse detection (-S), parallel requests (-m), in-order writes unless
// -W, compressed output (-c: whole clusters written with kRequestWriteCompressed, which qcow2
// compresses on every core), target creation with -o options, backing files (-B/-F: only what the
// source's top layer allocates is copied) and existing targets (-n, --target-is-zero). Several
// sources are concatenated; -l reads an internal snapshot, --salvage zeroes unreadable sectors,
// -C offloads raw->raw copies to copy_file_range, -r throttles target writes and --bitmaps
// copies persistent bitmaps afterwards (img_convert_bitmaps.cc).

#include <getopt.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/io/request.h"
#include "cli/img_convert_mapped_source.h"
#include "cli/img_internal.h"
#include "cli/img_rate_limit.h"

namespace strata::cli::img {

namespace {

enum {
  kOptImageOpts = 256,
  kOptObject,
  kOptTargetIsZero,
  kOptBitmaps,
  kOptSkipBrokenBitmaps,
  kOptSalvage
};
constexpr uint64_t kSectorSize = 512;
constexpr uint64_t kBufferBytes = 2 << 20;

// What a chunk of the source holds (qemu-img's ImgConvertBlockStatus).
enum class ChunkKind { kData, kZero, kBackingFile };

struct Chunk {
  ChunkKind kind = ChunkKind::kData;
  uint64_t bytes = 0;
  // Where a data chunk's bytes lie unchanged in a file, when block status says so (else nullptr).
  block::Node* file = nullptr;
  uint64_t file_offset = 0;
};

// One source image; several are concatenated (qemu-img's src[] and src_sectors[]).
struct SourcePart {
  block::Node* node = nullptr;
  uint64_t start = 0;  // where its bytes begin in the concatenation
  uint64_t length = 0;
};

struct ConvertState {
  std::vector<SourcePart> sources;
  block::Node* target = nullptr;
  uint64_t total = 0;
  // --salvage: unreadable sectors become zeroes (with a warning unless `quiet`), block-status
  // errors are retried on shorter ranges down to a sector that is then read as data.
  bool salvage = false;
  bool quiet = false;
  // -C: data chunks are copied with copy_file_range until that fails once.
  bool copy_range = false;
  std::unique_ptr<WriteRateLimit> rate_limit;  // -r
  // -c: data goes out in whole target clusters with kRequestWriteCompressed; chunks start and end
  // on cluster boundaries (or at the end of the image).
  bool compressed = false;
  uint64_t cluster_size = 0;
  // The target has a backing file (-B, or -n onto an image with one): only the source's top
  // layer is copied, unallocated areas are left to the target's backing file.
  bool target_has_backing = false;
  uint64_t target_backing_length = 0;
  uint64_t min_sparse = 8;  // sectors; 0 disables sparse detection
  uint64_t alignment = 8;   // sectors: zero runs are aligned to this in the target
  bool has_zero_init = false;
  bool in_order = true;
  bool progress = false;
  double last_progress = -1;
  uint64_t done_bytes = 0;

  // Chunks are handed out in order; their writes are issued in that order unless -W.
  aio::CoMutex allocate_lock;
  uint64_t next_offset = 0;
  uint64_t write_offset = 0;
  aio::CoQueue write_turn;
  std::optional<std::string> error;

  // Data chunks the page cache holds are used in place (img_convert_mapped_source.h); null when
  // the source graph does not allow it.
  std::unique_ptr<MappedSource> mapped_source;
};

// Whether `length` bytes are all zero: the first word decides most data buffers at once; the
// rest is compared with itself shifted by one byte, which libc's vectorised memcmp does far
// faster than a loop (qemu's buffer_is_zero plays the same part). A byte-by-byte loop cost a
// fifth of a raw->qcow2 convert.
bool sector_is_zero(const uint8_t* data, uint64_t length) {
  if (length == 0) {
    return true;
  }
  if (length >= 8) {
    uint64_t first = 0;
    std::memcpy(&first, data, sizeof(first));
    if (first != 0) {
      return false;
    }
  }
  return data[0] == 0 && std::memcmp(data, data + 1, length - 1) == 0;
}

// qemu-img's is_allocated_sectors: the run of sectors at the start of `buffer` that are all zero
// or all non-zero, with the end aligned to `alignment` sectors of the target.
bool allocated_sectors(const uint8_t* buffer, uint64_t sectors, uint64_t sector_num,
                       uint64_t alignment, uint64_t& run) {
  if (sectors == 0) {
    run = 0;
    return false;
  }
  bool is_zero = sector_is_zero(buffer, kSectorSize);
  uint64_t i = 1;
  if (is_zero) {
    // Zero runs are skipped a page at a time; the sector loop below finds where one ends.
    constexpr uint64_t kBlock = 8;
    while (i + kBlock <= sectors &&
           sector_is_zero(buffer + i * kSectorSize, kBlock * kSectorSize)) {
      i += kBlock;
    }
  }
  for (; i < sectors; ++i) {
    if (is_zero != sector_is_zero(buffer + i * kSectorSize, kSectorSize)) {
      break;
    }
  }
  if (i == sectors) {
    run = i;
    return !is_zero;
  }
  uint64_t tail = (sector_num + i) & (alignment - 1);
  if (tail != 0) {
    if (is_zero && i <= tail) {
      is_zero = false;
    }
    if (!is_zero) {
      i = std::min(i + alignment - tail, sectors);
    } else {
      i -= tail;
    }
  }
  run = i;
  return !is_zero;
}

// is_allocated_sectors_min: zero runs shorter than `min` sectors count as data.
bool allocated_sectors_min(const uint8_t* buffer, uint64_t sectors, uint64_t sector_num,
                           uint64_t min, uint64_t alignment, uint64_t& run) {
  min = std::min(min, sectors);
  bool allocated = allocated_sectors(buffer, sectors, sector_num, alignment, run);
  if (!allocated) {
    return false;
  }
  uint64_t used = run;
  uint64_t checked = run;
  buffer += run * kSectorSize;
  sectors -= run;
  sector_num += run;
  while (sectors > 0) {
    uint64_t part = 0;
    bool data = allocated_sectors(buffer, sectors, sector_num, alignment, part);
    buffer += part * kSectorSize;
    sectors -= part;
    sector_num += part;
    checked += part;
    if (data) {
      used = checked;
    } else if (part >= min) {
      break;
    }
  }
  run = used;
  return true;
}

void print_progress(ConvertState& s, bool force) {
  if (!s.progress) {
    return;
  }
  double percent = s.total == 0
                       ? 100.0
                       : 100.0 * static_cast<double>(s.done_bytes) / static_cast<double>(s.total);
  if (force || percent - s.last_progress >= 1.0) {
    s.last_progress = percent;
    std::printf("    (%3.2f/100%%)\r", percent);
    std::fflush(stdout);
  }
}

// The source part holding byte `offset` of the concatenation (qemu-img's convert_select_part).
const SourcePart& part_at(const ConvertState& s, uint64_t offset) {
  for (const SourcePart& part : s.sources) {
    if (offset - part.start < part.length) {
      return part;
    }
  }
  return s.sources.back();
}

void warn(const ConvertState& s, const std::string& message) {
  if (!s.quiet) {
    report("warning: " + message);
  }
}

// qemu-img's convert_co_read: reads across parts; with --salvage a failed read is retried a
// sector at a time and sectors that still fail read as zeroes.
aio::Task<Result<void>> read_sources(ConvertState& s, uint64_t offset, uint8_t* buffer,
                                     uint64_t bytes) {
  uint64_t single_read_until = 0;
  while (bytes > 0) {
    const SourcePart& part = part_at(s, offset);
    const uint64_t local = offset - part.start;
    uint64_t n = std::min(bytes, part.length - local);
    if (single_read_until > offset) {
      n = std::min(n, kSectorSize);
    }
    Result<void> read = co_await block::io::pread(*part.node, local, buffer, n);
    if (!read) {
      if (!s.salvage) {
        co_return read;
      }
      if (n > kSectorSize) {
        single_read_until = offset + n;
        continue;
      }
      warn(s,
           "error while reading offset " + std::to_string(local) + ": " + errno_text(read.error()));
      std::memset(buffer, 0, n);
    }
    offset += n;
    bytes -= n;
    buffer += n;
  }
  co_return ok();
}

aio::Task<Result<void>> target_pwrite(ConvertState& s, uint64_t offset, const uint8_t* data,
                                      uint64_t bytes, uint32_t flags) {
  co_await s.rate_limit->admit(bytes);
  Result<void> written = co_await block::io::pwrite(*s.target, offset, data, bytes, flags);
  co_return written;
}

aio::Task<Result<void>> write_zero_range(ConvertState& s, uint64_t offset, uint64_t bytes) {
  if (s.has_zero_init) {
    co_return ok();
  }
  co_await s.rate_limit->admit(bytes);
  uint32_t flags = s.min_sparse > 0 ? static_cast<uint32_t>(block::kRequestMayUnmap) : 0u;
  Result<void> r = co_await block::io::pwrite_zeroes(*s.target, offset, bytes, flags);
  co_return r;
}

// The status of `bytes` at `local` in `part`: with a backing file on the target only the top
// layer counts, otherwise the whole backing chain. A data chunk also says where its bytes lie
// unchanged in a file, when they do.
aio::Task<Result<Chunk>> source_status(ConvertState& s, const SourcePart& part, uint64_t local,
                                       uint64_t bytes) {
  Chunk chunk;
  if (s.target_has_backing) {
    Result<block::BlockStatus> status = co_await block::io::block_status(*part.node, local, bytes);
    if (!status) {
      co_return std::move(status).error();
    }
    chunk.kind = ChunkKind::kBackingFile;
    if (status->flags & block::BlockStatus::kZero) {
      // Zeroes past the end of the target's backing file are there already.
      chunk.kind = local >= s.target_backing_length ? ChunkKind::kBackingFile : ChunkKind::kZero;
    } else if (status->flags & block::BlockStatus::kData) {
      chunk.kind = ChunkKind::kData;
      if ((status->flags & block::BlockStatus::kOffsetValid) != 0 &&
          (status->flags & block::BlockStatus::kCompressed) == 0) {
        chunk.file = status->file;
        chunk.file_offset = status->map_offset;
      }
    }
    chunk.bytes = std::min(status->bytes, bytes);
    co_return chunk;
  }
  Result<ChainStatus> status = co_await chain_status(*part.node, local, bytes);
  if (!status) {
    co_return std::move(status).error();
  }
  chunk.kind = status->zero ? ChunkKind::kZero : ChunkKind::kData;
  chunk.bytes = std::min(status->bytes, bytes);
  if (status->data && !status->zero && status->has_offset && !status->compressed) {
    chunk.file = status->file;
    chunk.file_offset = status->offset;
  }
  co_return chunk;
}

// The kind and length of the chunk at `offset` (at most kBufferBytes): qemu-img's
// convert_iteration_sectors. With a backing file on the target only the top layer counts.
aio::Task<Result<Chunk>> next_chunk(ConvertState& s, uint64_t offset) {
  const SourcePart& part = part_at(s, offset);
  const uint64_t local = offset - part.start;
  const uint64_t limit = std::min(kBufferBytes, part.start + part.length - offset);
  Chunk chunk;
  uint64_t probe = limit;
  for (;;) {
    Result<Chunk> status = co_await source_status(s, part, local, probe);
    if (status) {
      chunk = *status;
      break;
    }
    if (!s.salvage) {
      co_return std::move(status).error();
    }
    if (probe <= kSectorSize) {
      // Just try to read the data, then.
      warn(s, "error while reading block status at offset " + std::to_string(local) + ": " +
                  errno_text(status.error()));
      chunk = Chunk{ChunkKind::kData, probe, nullptr, 0};
      break;
    }
    probe = (probe / kSectorSize + 3) / 4 * kSectorSize;  // retry on a shorter range
  }
  const uint64_t mapped_bytes = chunk.bytes;
  if (chunk.kind == ChunkKind::kZero && s.min_sparse == 0) {
    chunk.kind = ChunkKind::kData;  // -S 0: the target is fully allocated
  }
  if (s.compressed) {
    // Whole clusters: a zero or backing run keeps its whole clusters, anything shorter than a
    // cluster is read and written as data (its zero clusters are still detected and skipped).
    const uint64_t cs = s.cluster_size;
    const uint64_t end = offset + chunk.bytes;
    if (chunk.kind != ChunkKind::kData && end - end % cs > offset) {
      chunk.bytes = end == s.total ? chunk.bytes : end - end % cs - offset;
    } else {
      chunk.kind = ChunkKind::kData;
      chunk.bytes = std::min((end + cs - 1) / cs * cs, s.total) - offset;
      // A cluster may span source parts (read_sources crosses them).
      chunk.bytes = std::min(chunk.bytes, std::min(kBufferBytes, s.total - offset));
    }
  }
  if (chunk.kind != ChunkKind::kData || chunk.bytes > mapped_bytes) {
    chunk.file = nullptr;  // -c may round a chunk out past the run block status described
  }
  co_return chunk;
}

// One write of a chunk: data (with its request flags) or a zero run, which is left to the
// target's zero initialisation or written as zeroes.
struct Piece {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  bool data = true;
  uint32_t flags = 0;
};

// How a data chunk is written for -c: zero clusters are skipped (or zeroed), runs of other
// clusters are written compressed in one request (the driver compresses its clusters in parallel).
std::vector<Piece> plan_compressed_chunk(const ConvertState& s, uint64_t offset,
                                         const uint8_t* data, uint64_t bytes) {
  std::vector<Piece> pieces;
  const uint64_t cs = s.cluster_size;
  uint64_t done = 0;
  while (done < bytes) {
    const uint64_t n = std::min(cs, bytes - done);
    const bool zero = s.min_sparse > 0 && sector_is_zero(data + done, n);
    uint64_t run = n;
    while (done + run < bytes) {
      const uint64_t next = std::min(cs, bytes - done - run);
      if ((s.min_sparse > 0 && sector_is_zero(data + done + run, next)) != zero) {
        break;
      }
      run += next;
    }
    pieces.push_back(Piece{offset + done, run, !zero,
                           zero ? 0u : static_cast<uint32_t>(block::kRequestWriteCompressed)});
    done += run;
  }
  return pieces;
}

// How a data chunk is written: zero runs of at least -S are left to the target's zero
// initialisation (or written as zeroes), everything else is written (qemu-img's
// is_allocated_sectors_min). Decided before the chunk's turn to write, so that this scan runs
// while earlier chunks are being written.
std::vector<Piece> plan_data_chunk(const ConvertState& s, uint64_t offset, const uint8_t* data,
                                   uint64_t bytes) {
  if (s.compressed) {
    return plan_compressed_chunk(s, offset, data, bytes);
  }
  if (s.min_sparse == 0) {
    return {Piece{offset, bytes, true, 0}};
  }
  std::vector<Piece> pieces;
  uint64_t done = 0;
  while (done < bytes) {
    const uint64_t remaining = bytes - done;
    uint64_t run = 0;
    bool is_data = true;
    if (remaining % kSectorSize == 0 && (offset + done) % kSectorSize == 0) {
      is_data =
          allocated_sectors_min(data + done, remaining / kSectorSize, (offset + done) / kSectorSize,
                                s.min_sparse, s.alignment, run);
      run *= kSectorSize;
    } else {
      run = remaining;
    }
    pieces.push_back(Piece{offset + done, run, is_data, 0});
    done += run;
  }
  return pieces;
}

// Writes one piece; the first failure of a chunk's pieces is kept in `result`.
aio::Task<void> write_piece(ConvertState& s, Piece piece, const uint8_t* data,
                            Result<void>& result) {
  // (if/else, not ?: — GCC 12 miscompiles co_await in both arms of a conditional.)
  Result<void> written;
  if (piece.data) {
    written = co_await target_pwrite(s, piece.offset, data, piece.bytes, piece.flags);
  } else {
    written = co_await write_zero_range(s, piece.offset, piece.bytes);
  }
  if (!written && result.ok()) {
    result = std::move(written);
  }
}

// qemu-img's convert_co_copy_range over the parts `bytes` at `offset` spans.
bool copy_range_chunk(ConvertState& s, uint64_t offset, uint64_t bytes) {
  while (bytes > 0) {
    const SourcePart& part = part_at(s, offset);
    const uint64_t local = offset - part.start;
    const uint64_t n = std::min(bytes, part.length - local);
    if (!copy_file_range_between(*part.node, local, *s.target, offset, n)) {
      return false;
    }
    offset += n;
    bytes -= n;
  }
  return true;
}

aio::Task<void> worker(ConvertState& s) {
  std::vector<uint8_t> buffer(kBufferBytes);
  while (!s.error) {
    co_await s.allocate_lock.lock();
    const uint64_t offset = s.next_offset;
    if (offset >= s.total) {
      s.allocate_lock.unlock();
      break;
    }
    Result<Chunk> chunk = co_await next_chunk(s, offset);
    if (!chunk) {
      s.error = "error while reading block status at offset " + std::to_string(offset) + ": " +
                errno_text(chunk.error());
      s.allocate_lock.unlock();
      break;
    }
    const ChunkKind kind = chunk->kind;
    const uint64_t bytes = chunk->bytes;
    s.next_offset = offset + bytes;
    s.allocate_lock.unlock();

    // -C: data is copied at its turn to write; reading happens only when that fails.
    bool offloaded = false;
    const bool try_offload = s.copy_range && kind == ChunkKind::kData;
    const uint8_t* data = buffer.data();
    if (kind == ChunkKind::kData && !try_offload && s.mapped_source != nullptr &&
        chunk->file != nullptr) {
      const uint8_t* in_place = s.mapped_source->view(*chunk->file, chunk->file_offset, bytes);
      if (in_place != nullptr) {
        data = in_place;
      }
    }
    if (kind == ChunkKind::kData && !try_offload && data == buffer.data()) {
      Result<void> read = co_await read_sources(s, offset, buffer.data(), bytes);
      if (!read) {
        s.error = "error while reading at byte " + std::to_string(offset) + ": " +
                  errno_text(read.error());
        break;
      }
    }
    while (s.in_order && s.write_offset != offset && !s.error) {
      co_await s.write_turn.wait();
    }
    if (s.error) {
      break;
    }
    if (try_offload) {
      offloaded = copy_range_chunk(s, offset, bytes);
      if (!offloaded) {
        s.copy_range = false;  // qemu-img falls back for good after a failed offload
        Result<void> read = co_await read_sources(s, offset, buffer.data(), bytes);
        if (!read) {
          s.error = "error while reading at byte " + std::to_string(offset) + ": " +
                    errno_text(read.error());
          s.write_turn.notify_all();
          break;
        }
      }
    }
    std::vector<Piece> pieces;
    if (offloaded) {
      // already written
    } else if (kind == ChunkKind::kData) {
      pieces = plan_data_chunk(s, offset, data, bytes);
    } else if (kind == ChunkKind::kZero) {
      pieces.push_back(Piece{offset, bytes, false, 0});
    }
    // In order means issued in order: each piece runs until its first suspension inside spawn
    // (the target allocates its clusters in that order), and the next chunk may start issuing
    // while these are still being written, so the target's file always has writes queued.
    Result<void> written;
    {
      aio::TaskGroup writes;
      for (const Piece& piece : pieces) {
        writes.spawn(write_piece(s, piece, data + (piece.offset - offset), written));
      }
      if (s.in_order) {
        s.write_offset = offset + bytes;
        s.write_turn.notify_all();
      }
      co_await writes.wait();
    }
    if (!written) {
      if (!s.error) {
        s.error = "error while writing at byte " + std::to_string(offset) + ": " +
                  errno_text(written.error());
      }
      s.write_turn.notify_all();
      break;
    }
    s.done_bytes += bytes;
    print_progress(s, false);
  }
  s.write_turn.notify_all();
}

aio::Task<void> run_convert(ConvertState& s, int coroutines) {
  aio::TaskGroup workers;
  for (int i = 0; i < coroutines; ++i) {
    workers.spawn(worker(s));
  }
  co_await workers.wait();
  if (!s.error) {
    Result<void> flushed = co_await block::io::flush(*s.target);
    if (!flushed) {
      s.error = "error while flushing: " + errno_text(flushed.error());
    }
  }
}

uint64_t pow2floor(uint64_t value) {
  uint64_t result = 1;
  while (result * 2 <= value) {
    result *= 2;
  }
  return result;
}

}  // namespace

namespace {

bool valid_cache_mode(const std::string& mode) {
  static const std::array<const char*, 5> kModes = {"none", "writeback", "unsafe", "directsync",
                                                    "writethrough"};
  return std::find_if(kModes.begin(), kModes.end(), [&](const char* m) { return mode == m; }) !=
         kModes.end();
}

}  // namespace

int convert_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"object", required_argument, nullptr, kOptObject},
      {"force-share", no_argument, nullptr, 'U'},
      {"target-is-zero", no_argument, nullptr, kOptTargetIsZero},
      {"bitmaps", no_argument, nullptr, kOptBitmaps},
      {"skip-broken-bitmaps", no_argument, nullptr, kOptSkipBrokenBitmaps},
      {"salvage", no_argument, nullptr, kOptSalvage},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest source;
  std::string output_format = "raw";
  std::vector<std::string> option_strings;
  std::optional<std::string> backing_file;
  std::optional<std::string> backing_format;
  bool skip_create = false;
  bool quiet = false;
  bool image_opts = false;
  bool target_is_zero = false;
  int coroutines = 8;
  bool bitmaps = false;
  bool skip_broken_bitmaps = false;
  bool explicit_min_sparse = false;
  uint64_t rate_limit = 0;
  std::optional<SnapshotSelector> snapshot;
  std::string target_cache = "unsafe";
  ConvertState state;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hf:O:B:F:Cco:l:S:pt:T:qnm:Wr:U", kLongOptions, nullptr)) !=
         -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img convert [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-c] [-B BACKING "
            "[-F FMT]] [-n [--target-is-zero]] [-S SIZE] [-p] [-q] [-m N] [-W] [-t CACHE] "
            "[-T CACHE] [-U] [-l SNAPSHOT_PARAM] [-C] [-r RATE] [--salvage] "
            "[--bitmaps [--skip-broken-bitmaps]] [--image-opts] SOURCE [SOURCE2...] "
            "TARGET\n");
        return 0;
      case 'f':
        source.format = optarg;
        break;
      case 'O':
        output_format = optarg;
        break;
      case 'o':
        option_strings.emplace_back(optarg);
        break;
      case 'c':
        state.compressed = true;
        break;
      case 'B':
        backing_file = optarg;
        break;
      case 'F':
        backing_format = optarg;
        break;
      case 'n':
        skip_create = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'p':
        state.progress = true;
        break;
      case 'W':
        state.in_order = false;
        break;
      case 'U':
        source.force_share = true;
        break;
      case 't':
        target_cache = optarg;
        if (!valid_cache_mode(target_cache)) {
          report("Invalid cache option: " + target_cache);
          return 1;
        }
        break;
      case 'T': {
        std::string mode = optarg;
        if (!valid_cache_mode(mode)) {
          report("Invalid source cache option: " + mode);
          return 1;
        }
        source.cache_direct = mode == "none" || mode == "directsync";
        break;
      }
      case 'S': {
        auto value = parse_size(optarg);
        if (!value || *value % kSectorSize != 0 || *value > (uint64_t{16} << 20)) {
          report(
              "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
              "512 up to 16777216. Select 0 to disable sparse detection (fully allocates "
              "output).");
          return 1;
        }
        state.min_sparse = *value / kSectorSize;
        explicit_min_sparse = true;
        break;
      }
      case 'm': {
        char* end = nullptr;
        errno = 0;
        long value = std::strtol(optarg, &end, 10);
        if (*optarg == '\0' || *end != '\0' || errno != 0) {
          report(std::string("Invalid number of coroutines specified: '") + optarg + "'.");
          return 1;
        }
        if (value < 1 || value > 16) {
          report("Invalid number of coroutines specified. Must be between 1 and 16.");
          return 1;
        }
        coroutines = static_cast<int>(value);
        break;
      }
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case kOptTargetIsZero:
        target_is_zero = true;
        break;
      case 'l':
        snapshot = parse_snapshot_param(optarg);
        if (!snapshot) {
          return 1;
        }
        break;
      case 'C':
        state.copy_range = true;
        break;
      case 'r': {
        auto value = parse_number(optarg, "rate limit", true, 0, INT64_MAX);
        if (!value) {
          return 1;
        }
        rate_limit = static_cast<uint64_t>(*value);
        break;
      }
      case kOptBitmaps:
        bitmaps = true;
        break;
      case kOptSkipBrokenBitmaps:
        skip_broken_bitmaps = true;
        break;
      case kOptSalvage:
        state.salvage = true;
        break;
      case ':':
        return missing_argument(argv[optind - 1]);
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  if (skip_broken_bitmaps && !bitmaps) {
    report("Use of --skip-broken-bitmaps requires --bitmaps");
    return 1;
  }
  if (state.compressed && state.copy_range) {
    report("Cannot enable copy offloading when -c is used");
    return 1;
  }
  if (explicit_min_sparse && state.copy_range) {
    report("Cannot enable copy offloading when -S is used");
    return 1;
  }
  if (state.copy_range && state.salvage) {
    report("Cannot use copy offloading in salvaging mode");
    return 1;
  }
  if (quiet) {
    state.progress = false;
  }
  state.quiet = quiet;
  if (argc - optind < 2) {
    report("Must specify image file name");
    return 1;
  }
  if (output_format != "raw" && output_format != "qcow2") {
    static const char* const kQemuFormats[] = {"vmdk",      "vdi",  "vpc",   "vhdx", "qcow", "qed",
                                               "parallels", "luks", "cloop", "dmg",  "bochs"};
    for (const char* known : kQemuFormats) {
      if (output_format == known) {
        report("Writing the '" + output_format + "' format is not supported by strata img yet");
        return 1;
      }
    }
    report("Unknown file format '" + output_format + "'");
    return 1;
  }
  if (target_is_zero && !skip_create) {
    report("--target-is-zero requires use of -n flag");
    return 1;
  }
  auto items = split_options(option_strings);
  if (!items) {
    report(items.error().message());
    return 1;
  }
  std::map<std::string, std::string> create_options;
  for (const auto& [key, value] : *items) {
    const bool known = output_format == "qcow2" ? is_qcow2_create_option(key)
                                                : key == "size" || key == "preallocation";
    if (!known) {
      report("Invalid parameter '" + key + "'");
      return 1;
    }
    create_options[key] = value;
  }
  if (backing_file) {
    if (output_format == "raw") {
      report("Backing file not supported for file format 'raw'");
      return 1;
    }
    create_options["backing_file"] = *backing_file;
  }
  if (backing_format) {
    create_options["backing_fmt"] = *backing_format;
  }
  if (create_options.count("backing_file") != 0 && create_options.count("backing_fmt") == 0) {
    report("Use of backing file requires explicit backing format");
    return 1;
  }
  if (state.compressed && output_format != "qcow2") {
    report("Compression not supported for this file format");
    return 1;
  }
  const std::vector<std::string> source_names(argv + optind, argv + argc - 1);
  std::string target_name = argv[argc - 1];
  auto session = BlockSession::create();
  if (!session) {
    report(session.error().message());
    return 1;
  }
  for (const std::string& source_name : source_names) {
    if (image_opts) {
      source.image_opts = source_name;
    } else {
      source.filename = source_name;
    }
    auto opened = (*session)->open(source);
    if (!opened) {
      report("Could not open '" + source_name + "': " + opened.error().message());
      return 1;
    }
    state.sources.push_back({*opened, state.total, (*opened)->length()});
    state.total += (*opened)->length();
  }
  if (snapshot) {
    if (snapshot->id_or_name && source_names.size() > 1) {
      report("No support for concatenating multiple snapshot");
      return 1;
    }
    Result<void> loaded = load_snapshot(**session, *state.sources[0].node, *snapshot);
    if (!loaded) {
      report("Failed to load snapshot: " + loaded.error().message());
      return 1;
    }
  }
  if (source_names.size() > 1 && create_options.count("backing_file") != 0) {
    report(
        "Having a backing file for the target makes no sense when concatenating multiple input "
        "images");
    return 1;
  }
  if (bitmaps) {
    if (source_names.size() > 1) {
      report("Copying bitmaps only possible with single source");
      return 1;
    }
    if (!check_bitmaps_copyable(*state.sources[0].node, skip_broken_bitmaps)) {
      return 1;
    }
  }
  if (!skip_create) {
    if (output_format == "qcow2") {
      create_options.erase("size");  // the target gets the source's size
      // The backing file is not opened here (qemu-img convert creates with bdrv_create), so a
      // backing file that does not exist yet is fine until the target is opened.
      if (create_qcow2(target_name, create_options, state.total, true, true,
                       "error while converting qcow2: ") != 0) {
        return 1;
      }
    } else {
      auto prealloc = create_options.find("preallocation");
      auto created = create_raw_file(target_name, state.total,
                                     prealloc == create_options.end() ? "off" : prealloc->second);
      if (!created) {
        // NBD targets' create errors already name the target (img create prints them alone).
        std::string message = created.error().message();
        if (message.rfind(target_name + ": ", 0) == 0) {
          message.erase(0, target_name.size() + 2);
        }
        report(target_name + ": error while converting raw: " + message);
        return 1;
      }
    }
  }
  ImageOpenRequest target;
  target.filename = target_name;
  target.format = output_format;
  target.read_only = false;
  target.discard_unmap = state.min_sparse > 0;
  target.cache_direct = target_cache == "none" || target_cache == "directsync";
  target.cache_no_flush = target_cache == "unsafe";
  auto target_node = (*session)->open(target);
  if (!target_node) {
    report("Could not open '" + target_name + "': " + target_node.error().message());
    return 1;
  }
  state.target = *target_node;
  if (bitmaps && !supports_persistent_bitmaps(*state.target)) {
    report(std::string("Format driver '") + state.target->format_name() +
           "' does not support bitmaps");
    return 1;
  }
  state.rate_limit = std::make_unique<WriteRateLimit>((*session)->loop(), rate_limit);
  if (skip_create && state.target->length() < state.total) {
    report("Error: target is smaller than source");  // checked before any write
    return 1;
  }
  if (block::Child* backing = state.target->backing_child(); backing != nullptr) {
    state.target_has_backing = true;
    state.target_backing_length = backing->node()->length();
  }
  if (state.compressed) {
    if (!state.target->supports_compressed_writes()) {
      report("Compression not supported for this file format");
      return 1;
    }
    state.cluster_size = state.target->cluster_size().value_or(0);
    if (state.cluster_size == 0 || state.cluster_size > kBufferBytes) {
      report("invalid cluster size");
      return 1;
    }
  }
  // A freshly created regular file or qcow2 image without a backing file reads as zeroes; an
  // existing target (-n) only with --target-is-zero.
  struct stat st {};
  state.has_zero_init = (!skip_create && !state.target_has_backing &&
                         ::stat(target_name.c_str(), &st) == 0 && S_ISREG(st.st_mode)) ||
                        target_is_zero;
  uint64_t request_sectors =
      std::max<uint64_t>(1, state.target->limits().request_alignment / kSectorSize);
  state.alignment = std::max(pow2floor(std::max<uint64_t>(state.min_sparse, 1)), request_sectors);
  // With -U another process may be writing the source, and a mapping of a file that shrinks
  // under it faults (SIGBUS) where a read only comes back short: read through the block layer.
  const bool sources_mappable =
      std::all_of(state.sources.begin(), state.sources.end(),
                  [](const SourcePart& part) { return MappedSource::graph_allows(*part.node); });
  if (!source.force_share && sources_mappable) {
    state.mapped_source = std::make_unique<MappedSource>();
  }
  print_progress(state, true);
  (*session)->loop().block_on(run_convert(state, coroutines));
  if (state.error) {
    if (state.progress) {
      std::printf("\n");
    }
    report(*state.error);
    return 1;
  }
  if (bitmaps &&
      !copy_bitmaps(**session, *state.sources[0].node, *state.target, skip_broken_bitmaps)) {
    return 1;
  }
  if (state.progress) {
    state.done_bytes = state.total;
    print_progress(state, true);
    std::printf("\n");
  }
  return 0;
}

}  // namespace strata::cli::img
