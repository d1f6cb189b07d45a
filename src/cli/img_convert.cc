// `strata img convert` to raw: qemu-img convert's chunking (block status of the source, at most
// 2 MiB per request), sparse detection (-S), parallel requests (-m) and in-order writes unless -W.

#include <getopt.h>
#include <sys/stat.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/io/request.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptImageOpts = 256, kOptTargetIsZero };
constexpr uint64_t kSectorSize = 512;
constexpr uint64_t kBufferBytes = 2 << 20;

struct ConvertState {
  block::Node* source = nullptr;
  block::Node* target = nullptr;
  uint64_t total = 0;
  uint64_t min_sparse = 8;  // sectors; 0 disables sparse detection
  uint64_t alignment = 8;   // sectors: zero runs are aligned to this in the target
  bool has_zero_init = false;
  bool in_order = true;
  bool progress = false;
  double last_progress = -1;
  uint64_t done_bytes = 0;

  // Chunks are handed out in order; writes happen in that order unless -W.
  aio::CoMutex allocate_lock;
  uint64_t next_offset = 0;
  uint64_t write_offset = 0;
  aio::CoQueue write_turn;
  std::optional<std::string> error;
};

bool sector_is_zero(const uint8_t* data, uint64_t length) {
  for (uint64_t i = 0; i < length; ++i) {
    if (data[i] != 0) {
      return false;
    }
  }
  return true;
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

aio::Task<Result<void>> write_zero_range(ConvertState& s, uint64_t offset, uint64_t bytes) {
  if (s.has_zero_init) {
    co_return ok();
  }
  uint32_t flags = s.min_sparse > 0 ? static_cast<uint32_t>(block::kRequestMayUnmap) : 0u;
  Result<void> r = co_await block::io::pwrite_zeroes(*s.target, offset, bytes, flags);
  co_return r;
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
    Result<ChainStatus> status =
        co_await chain_status(*s.source, offset, std::min(kBufferBytes, s.total - offset));
    if (!status) {
      s.error = "error while reading block status at offset " + std::to_string(offset) + ": " +
                errno_text(status.error());
      s.allocate_lock.unlock();
      break;
    }
    const uint64_t bytes = status->bytes;
    s.next_offset = offset + bytes;
    s.allocate_lock.unlock();

    const bool zero = status->zero && s.min_sparse > 0;
    if (!zero) {
      Result<void> read = co_await block::io::pread(*s.source, offset, buffer.data(), bytes);
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
    Result<void> written;
    if (zero) {
      written = co_await write_zero_range(s, offset, bytes);
    } else if (s.min_sparse == 0) {
      written = co_await block::io::pwrite(*s.target, offset, buffer.data(), bytes);
    } else {
      // Splits the data into runs: zero runs of at least -S are left to the target's zero
      // initialisation (or written as zeroes), everything else is written.
      uint64_t done = 0;
      while (done < bytes && written.ok()) {
        const uint64_t remaining = bytes - done;
        uint64_t run = 0;
        bool data = true;
        if (remaining % kSectorSize == 0 && (offset + done) % kSectorSize == 0) {
          data =
              allocated_sectors_min(buffer.data() + done, remaining / kSectorSize,
                                    (offset + done) / kSectorSize, s.min_sparse, s.alignment, run);
          run *= kSectorSize;
        } else {
          run = remaining;
        }
        if (data) {
          written = co_await block::io::pwrite(*s.target, offset + done, buffer.data() + done, run);
        } else {
          written = co_await write_zero_range(s, offset + done, run);
        }
        done += run;
      }
    }
    if (!written) {
      s.error = "error while writing at byte " + std::to_string(offset) + ": " +
                errno_text(written.error());
      s.write_turn.notify_all();
      break;
    }
    s.done_bytes += bytes;
    print_progress(s, false);
    if (s.in_order) {
      s.write_offset = offset + bytes;
      s.write_turn.notify_all();
    }
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

int convert_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"force-share", no_argument, nullptr, 'U'},
      {"target-is-zero", no_argument, nullptr, kOptTargetIsZero},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest source;
  std::string output_format = "raw";
  bool skip_create = false;
  bool quiet = false;
  bool image_opts = false;
  bool target_is_zero = false;
  int coroutines = 8;
  std::string target_cache = "unsafe";
  ConvertState state;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hf:O:B:Cco:l:S:pt:T:qnm:WrU", kLongOptions, nullptr)) !=
         -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img convert [-f FMT] [-O raw] [-n] [-S SIZE] [-p] [-q] [-m N] "
            "[-W] [-t CACHE] [-T CACHE] [-U] [--image-opts] SOURCE TARGET\n");
        return 0;
      case 'f':
        source.format = optarg;
        break;
      case 'O':
        output_format = optarg;
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
        break;
      case 'T': {
        std::string mode = optarg;
        source.cache_direct = mode == "none" || mode == "directsync";
        break;
      }
      case 'S': {
        auto value = parse_size(optarg);
        if (!value || *value % kSectorSize != 0 || *value > (uint64_t{1} << 31)) {
          report(
              "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
              "512 up to 2147483136.");
          return 1;
        }
        state.min_sparse = *value / kSectorSize;
        break;
      }
      case 'm': {
        char* end = nullptr;
        long value = std::strtol(optarg, &end, 10);
        if (*end != '\0' || value < 1 || value > 16) {
          report("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
          return 1;
        }
        coroutines = static_cast<int>(value);
        break;
      }
      case kOptImageOpts:
        image_opts = true;
        break;
      case kOptTargetIsZero:
        target_is_zero = true;
        break;
      case 'B':
      case 'c':
      case 'o':
      case 'l':
      case 'C':
      case 'r':
        report(std::string("option -") + static_cast<char>(c) +
               " is not supported by strata img convert yet");
        return 1;
      default:
        return error_exit(std::string("Unknown option '") + argv[optind - 1] + "'");
    }
  }
  if (quiet) {
    state.progress = false;
  }
  if (argc - optind < 2) {
    return error_exit("Must specify image file name");
  }
  if (argc - optind > 2) {
    report("Converting more than one source image is not supported by strata img yet");
    return 1;
  }
  if (output_format != "raw") {
    report("Writing the '" + output_format + "' format is not supported by strata img yet");
    return 1;
  }
  if (target_is_zero && !skip_create) {
    report("--target-is-zero requires use of -n flag");
    return 1;
  }
  std::string source_name = argv[optind];
  std::string target_name = argv[optind + 1];
  if (image_opts) {
    source.image_opts = source_name;
  } else {
    source.filename = source_name;
  }
  auto session = BlockSession::create();
  if (!session) {
    report(session.error().message());
    return 1;
  }
  auto opened = (*session)->open(source);
  if (!opened) {
    report("Could not open '" + source_name + "': " + opened.error().message());
    return 1;
  }
  state.source = *opened;
  state.total = state.source->length();
  if (!skip_create) {
    auto created = create_raw_file(target_name, state.total, "off");
    if (!created) {
      report(target_name + ": error while converting raw: " + created.error().message());
      return 1;
    }
  }
  ImageOpenRequest target;
  target.filename = target_name;
  target.format = "raw";
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
  if (skip_create && state.target->length() < state.total) {
    report("Error: target is smaller than source");  // checked before any write
    return 1;
  }
  // A freshly created regular file reads as zeroes; an existing target (-n) only with
  // --target-is-zero.
  struct stat st {};
  state.has_zero_init =
      (!skip_create && ::stat(target_name.c_str(), &st) == 0 && S_ISREG(st.st_mode)) ||
      target_is_zero;
  uint64_t request_sectors =
      std::max<uint64_t>(1, state.target->limits().request_alignment / kSectorSize);
  state.alignment = std::max(pow2floor(std::max<uint64_t>(state.min_sparse, 1)), request_sectors);
  print_progress(state, true);
  (*session)->loop().block_on(run_convert(state, coroutines));
  if (state.error) {
    if (state.progress) {
      std::printf("\n");
    }
    report(*state.error);
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
