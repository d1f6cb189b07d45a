// `strata img compare`: qemu-img compare's algorithm and exit codes (0 identical, 1 different,
// 2 open error, 3 block-status error, 4 read error).

#include <getopt.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "block/io/request.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptImageOpts = 256, kOptObject };
constexpr uint64_t kIoBufferSize = 2 << 20;
constexpr uint64_t kSectorSize = 512;

struct CompareState {
  block::Node* node1 = nullptr;
  block::Node* node2 = nullptr;
  std::string filename1;
  std::string filename2;
  bool strict = false;
  bool quiet = false;
  std::vector<uint8_t> buffer1 = std::vector<uint8_t>(kIoBufferSize);
  std::vector<uint8_t> buffer2 = std::vector<uint8_t>(kIoBufferSize);
};

void qprintf(bool quiet, const char* format, uint64_t value) {
  if (!quiet) {
    std::printf(format, value);
  }
}

// check_empty_sectors: 0 when [offset, offset + bytes) of `node` reads as zeroes, 1 (with the
// first non-zero byte reported) when not, 4 on a read error.
aio::Task<int> check_empty(CompareState& s, block::Node& node, const std::string& filename,
                           uint64_t offset, uint64_t bytes) {
  Result<void> read = co_await block::io::pread(node, offset, s.buffer1.data(), bytes);
  if (!read) {
    report("Error while reading offset " + std::to_string(offset) + " of " + filename + ": " +
           errno_text(read.error()));
    co_return 4;
  }
  for (uint64_t i = 0; i < bytes; ++i) {
    if (s.buffer1[i] != 0) {
      qprintf(s.quiet, "Content mismatch at offset %" PRIu64 "!\n", offset + i);
      co_return 1;
    }
  }
  co_return 0;
}

// compare_buffers with 512-byte granularity: whether the first sector differs, and how many
// bytes from the start share that answer.
bool compare_buffers(const uint8_t* a, const uint8_t* b, uint64_t bytes, uint64_t& same_run) {
  uint64_t first = std::min(bytes, kSectorSize);
  bool differs = std::memcmp(a, b, first) != 0;
  uint64_t i = first;
  while (i < bytes) {
    uint64_t length = std::min(kSectorSize, bytes - i);
    if ((std::memcmp(a + i, b + i, length) != 0) != differs) {
      break;
    }
    i += length;
  }
  same_run = i;
  return differs;
}

uint32_t status_bits(const ChainStatus& status) {
  return (status.data ? 1u : 0u) | (status.zero ? 2u : 0u) | (status.present ? 4u : 0u) |
         (status.has_offset ? 8u : 0u);
}

aio::Task<int> run_compare(CompareState& s) {
  const uint64_t size1 = s.node1->length();
  const uint64_t size2 = s.node2->length();
  if (s.strict && size1 != size2) {
    if (!s.quiet) {
      std::printf("Strict mode: Image size mismatch!\n");
    }
    co_return 1;
  }
  const uint64_t common = std::min(size1, size2);
  uint64_t offset = 0;
  while (offset < common) {
    Result<ChainStatus> status1 = co_await chain_status(*s.node1, offset, common - offset);
    if (!status1) {
      report("Sector allocation test failed for " + s.filename1);
      co_return 3;
    }
    Result<ChainStatus> status2 = co_await chain_status(*s.node2, offset, common - offset);
    if (!status2) {
      report("Sector allocation test failed for " + s.filename2);
      co_return 3;
    }
    uint64_t chunk = std::min(status1->bytes, status2->bytes);
    if (s.strict && status_bits(*status1) != status_bits(*status2)) {
      qprintf(s.quiet, "Strict mode: Offset %" PRIu64 " block status mismatch!\n", offset);
      co_return 1;
    }
    const bool allocated1 = status1->present;
    const bool allocated2 = status2->present;
    if (status1->zero && status2->zero) {
      // Both read as zeroes.
    } else if (allocated1 == allocated2) {
      if (allocated1) {
        chunk = std::min(chunk, kIoBufferSize);
        Result<void> read1 = co_await block::io::pread(*s.node1, offset, s.buffer1.data(), chunk);
        if (!read1) {
          report("Error while reading offset " + std::to_string(offset) + " of " + s.filename1 +
                 ": " + errno_text(read1.error()));
          co_return 4;
        }
        Result<void> read2 = co_await block::io::pread(*s.node2, offset, s.buffer2.data(), chunk);
        if (!read2) {
          report("Error while reading offset " + std::to_string(offset) + " of " + s.filename2 +
                 ": " + errno_text(read2.error()));
          co_return 4;
        }
        uint64_t same = 0;
        bool differs = compare_buffers(s.buffer1.data(), s.buffer2.data(), chunk, same);
        if (differs || same != chunk) {
          qprintf(s.quiet, "Content mismatch at offset %" PRIu64 "!\n",
                  offset + (differs ? 0 : same));
          co_return 1;
        }
      }
    } else {
      chunk = std::min(chunk, kIoBufferSize);
      int rc = 0;
      if (allocated1) {
        rc = co_await check_empty(s, *s.node1, s.filename1, offset, chunk);
      } else {
        rc = co_await check_empty(s, *s.node2, s.filename2, offset, chunk);
      }
      if (rc != 0) {
        co_return rc;
      }
    }
    offset += chunk;
  }
  if (size1 != size2) {
    if (!s.quiet) {
      std::printf("Warning: Image size mismatch!\n");
    }
    block::Node& over = size1 > size2 ? *s.node1 : *s.node2;
    const std::string& over_name = size1 > size2 ? s.filename1 : s.filename2;
    const uint64_t total = std::max(size1, size2);
    while (offset < total) {
      Result<ChainStatus> status = co_await chain_status(over, offset, total - offset);
      if (!status) {
        report("Sector allocation test failed for " + over_name);
        co_return 3;
      }
      uint64_t chunk = status->bytes;
      if (status->present && !status->zero) {
        chunk = std::min(chunk, kIoBufferSize);
        int rc = co_await check_empty(s, over, over_name, offset, chunk);
        if (rc != 0) {
          co_return rc;
        }
      }
      offset += chunk;
    }
  }
  if (!s.quiet) {
    std::printf("Images are identical.\n");
  }
  co_return 0;
}

}  // namespace

int compare_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"object", required_argument, nullptr, kOptObject},
      {"force-share", no_argument, nullptr, 'U'},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest first;
  ImageOpenRequest second;
  bool image_opts = false;
  CompareState state;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hf:F:T:pqsU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img compare [-f FMT] [-F FMT] [-s] [-q] [-p] [-U] "
            "[--image-opts] FILENAME1 FILENAME2\n");
        return 0;
      case 'f':
        first.format = optarg;
        break;
      case 'F':
        second.format = optarg;
        break;
      case 'q':
        state.quiet = true;
        break;
      case 's':
        state.strict = true;
        break;
      case 'U':
        first.force_share = true;
        second.force_share = true;
        break;
      case 'p':
      case 'T':
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      default:
        report(std::string("Unknown option '") + argv[optind - 1] + "'");
        return 2;
    }
  }
  if (optind != argc - 2) {
    report("Expecting two image file names");
    return 2;
  }
  state.filename1 = argv[optind];
  state.filename2 = argv[optind + 1];
  if (image_opts) {
    first.image_opts = state.filename1;
    second.image_opts = state.filename2;
  } else {
    first.filename = state.filename1;
    second.filename = state.filename2;
  }
  auto session = BlockSession::create();
  if (!session) {
    report(session.error().message());
    return 2;
  }
  auto opened1 = (*session)->open(first);
  if (!opened1) {
    report("Could not open '" + state.filename1 + "': " + opened1.error().message());
    return 2;
  }
  auto opened2 = (*session)->open(second);
  if (!opened2) {
    report("Could not open '" + state.filename2 + "': " + opened2.error().message());
    return 2;
  }
  state.node1 = *opened1;
  state.node2 = *opened2;
  return (*session)->loop().block_on(run_compare(state));
}

}  // namespace strata::cli::img
