// `strata img bench`: qemu-img bench's options, output and request pattern (QEMU's img_bench and
// bench_cb): COUNT requests of BUFFER_SIZE bytes, DEPTH in flight, the offset advancing by STEP
// and wrapping at the image size, optionally a flush every FLUSH_INTERVAL requests (with the
// queue drained first unless --no-drain).

#include <getopt.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/io/request.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptFlushInterval = 256, kOptImageOpts, kOptPattern, kOptNoDrain, kOptObject };

constexpr const char kBenchUsage[] =
    "usage: strata img bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]\n"
    "        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n] [-U] [-q]\n"
    "        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]] FILENAME\n";

// parse_number into `out`; false after a report.
bool parse_into(const char* text, const char* what, bool suffixes, int64_t min, int64_t max,
                int64_t& out) {
  const std::optional<int64_t> value = parse_number(text, what, suffixes, min, max);
  if (value) {
    out = *value;
  }
  return value.has_value();
}

// The request loop of qemu-img bench (bench_cb), run by one coroutine: requests report their
// completion here and the loop issues the next ones, so a request that completes without
// suspending never recurses into the next.
struct Bench {
  block::Node* node = nullptr;
  uint64_t image_size = 0;
  uint64_t bufsize = 0;
  uint64_t step = 0;
  int64_t nrreq = 0;
  int64_t n = 0;  // requests not yet completed
  int64_t in_flight = 0;
  uint64_t offset = 0;
  bool write = false;
  bool writethrough = false;
  int64_t flush_interval = 0;
  bool drain_on_flush = true;
  bool in_flush = false;     // a drained flush is running: issue nothing
  bool holding = false;      // draining the queue for the next flush
  int flushes_to_start = 0;  // flushes due, started by the loop
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<size_t> free_buffers;
  std::string error;
  aio::Event progress;
  aio::TaskGroup group;
};

aio::Task<void> bench_flush(Bench& b, bool drained) {
  Result<void> flushed = co_await block::io::flush(*b.node);
  if (!flushed && b.error.empty()) {
    b.error = "Failed flush request: " + errno_text(flushed.error());
  }
  if (drained) {
    b.in_flush = false;
  }
  b.progress.set();
}

aio::Task<void> bench_request(Bench& b, uint64_t offset, size_t buffer) {
  std::vector<uint8_t>& data = b.buffers[buffer];
  Result<void> done = ok();
  if (b.write) {
    done = co_await block::io::pwrite(*b.node, offset, data.data(), data.size());
    if (done && b.writethrough) {
      done = co_await block::io::flush(*b.node);
    }
  } else {
    done = co_await block::io::pread(*b.node, offset, data.data(), data.size());
  }
  b.free_buffers.push_back(buffer);
  b.progress.set();
  if (!done) {
    if (b.error.empty()) {
      b.error = "Failed request: " + errno_text(done.error());
    }
    co_return;
  }
  // bench_cb: after every flush_interval requests a flush, by default once the queue drained.
  const int64_t remaining = b.n - b.in_flight;
  --b.n;
  --b.in_flight;
  if (b.flush_interval != 0 && remaining % b.flush_interval == 0) {
    if (b.in_flight == 0 || !b.drain_on_flush) {
      ++b.flushes_to_start;
      if (b.drain_on_flush) {
        b.in_flush = true;
      }
    }
    b.holding = b.drain_on_flush && b.in_flight != 0;
  }
}

void bench_issue(Bench& b) {
  while (b.error.empty() && !b.in_flush && !b.holding && b.n > b.in_flight &&
         b.in_flight < b.nrreq) {
    const uint64_t offset = b.offset;
    ++b.in_flight;
    b.offset += b.step;
    b.offset = b.image_size == 0 ? 0 : b.offset % b.image_size;
    const size_t buffer = b.free_buffers.back();
    b.free_buffers.pop_back();
    b.group.spawn(bench_request(b, offset, buffer));
  }
}

aio::Task<void> bench_run(Bench& b, double& seconds) {
  const auto start = std::chrono::steady_clock::now();
  bench_issue(b);
  while (b.n > 0 && b.error.empty()) {
    co_await b.progress.wait();
    b.progress.reset();
    while (b.flushes_to_start > 0) {
      --b.flushes_to_start;
      b.holding = false;
      b.group.spawn(bench_flush(b, b.drain_on_flush));
    }
    bench_issue(b);
  }
  const auto end = std::chrono::steady_clock::now();
  seconds = std::chrono::duration<double>(end - start).count();
  co_await b.group.wait();
}

bool parse_cache_mode(const std::string& mode, ImageOpenRequest& request, bool& writethrough) {
  // QEMU's bdrv_parse_cache_mode.
  if (mode == "none" || mode == "off") {
    request.cache_direct = true;
  } else if (mode == "directsync") {
    request.cache_direct = true;
    writethrough = true;
  } else if (mode == "writeback") {
  } else if (mode == "unsafe") {
    request.cache_no_flush = true;
  } else if (mode == "writethrough") {
    writethrough = true;
  } else {
    return false;
  }
  return true;
}

}  // namespace

int bench_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"quiet", no_argument, nullptr, 'q'},
      {"format", required_argument, nullptr, 'f'},
      {"cache", required_argument, nullptr, 't'},
      {"count", required_argument, nullptr, 'c'},
      {"buffer-size", required_argument, nullptr, 's'},
      {"depth", required_argument, nullptr, 'd'},
      {"offset", required_argument, nullptr, 'o'},
      {"step-size", required_argument, nullptr, 'S'},
      {"aio", required_argument, nullptr, 'i'},
      {"native", no_argument, nullptr, 'n'},
      {"write", no_argument, nullptr, 'w'},
      {"force-share", no_argument, nullptr, 'U'},
      {"flush-interval", required_argument, nullptr, kOptFlushInterval},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"pattern", required_argument, nullptr, kOptPattern},
      {"no-drain", no_argument, nullptr, kOptNoDrain},
      {"object", required_argument, nullptr, kOptObject},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  bool image_opts = false;
  bool is_write = false;
  bool writethrough = false;
  bool native_aio = false;
  int64_t count = 75000;
  int64_t depth = 64;
  int64_t offset = 0;
  int64_t bufsize = 4096;
  int64_t pattern = 0;
  int64_t step = 0;
  int64_t flush_interval = 0;
  bool drain_on_flush = true;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hc:d:f:ni:o:qs:S:t:wU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf("%s", kBenchUsage);
        return 0;
      case 'c':
        if (!parse_into(optarg, "request count", false, 1, INT_MAX, count)) {
          return 1;
        }
        break;
      case 'd':
        if (!parse_into(optarg, "queue depth", false, 1, INT_MAX, depth)) {
          return 1;
        }
        break;
      case 'f':
        request.format = optarg;
        break;
      case 'n':
        native_aio = true;
        break;
      case 'i': {
        const std::string aio = optarg;
        if (aio != "threads" && aio != "native" && aio != "io_uring") {
          report("Invalid aio option: " + aio);
          return 1;
        }
        native_aio = aio == "native";
        break;
      }
      case 'o':
        if (!parse_into(optarg, "offset", true, 0, INT64_MAX, offset)) {
          return 1;
        }
        break;
      case 'q':
        break;  // qemu-img bench prints its lines regardless
      case 's':
        if (!parse_into(optarg, "buffer size", true, 1, INT_MAX, bufsize)) {
          return 1;
        }
        break;
      case 'S':
        if (!parse_into(optarg, "step size", true, 0, INT_MAX, step)) {
          return 1;
        }
        break;
      case 't':
        if (!parse_cache_mode(optarg, request, writethrough)) {
          report("Invalid cache mode");
          return 1;
        }
        break;
      case 'w':
        is_write = true;
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptPattern:
        if (!parse_into(optarg, "pattern byte", false, 0, 0xff, pattern)) {
          return 1;
        }
        break;
      case kOptFlushInterval:
        if (!parse_into(optarg, "flush interval", false, 0, INT_MAX, flush_interval)) {
          return 1;
        }
        break;
      case kOptNoDrain:
        drain_on_flush = false;
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case ':':
        return missing_argument(argv[optind - 1]);
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  const std::string filename = argv[argc - 1];
  if (!is_write && flush_interval != 0) {
    report("--flush-interval is only available in write tests");
    return 1;
  }
  if (flush_interval != 0 && flush_interval < depth) {
    report("Flush interval can't be smaller than depth");
    return 1;
  }
  if (native_aio && !request.cache_direct) {
    report("Could not open '" + filename +
           "': aio=native was specified, but it requires cache.direct=on, which was not "
           "specified.");
    return 1;
  }
  if (is_write && request.force_share) {
    report("Could not open '" + filename +
           "': force-share=on can only be used with read-only images");
    return 1;
  }
  request.read_only = !is_write;
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }

  Bench b;
  b.node = image->node;
  b.image_size = image->node->length();
  b.bufsize = static_cast<uint64_t>(bufsize);
  b.step = step != 0 ? static_cast<uint64_t>(step) : b.bufsize;
  b.nrreq = depth;
  b.n = count;
  b.offset = static_cast<uint64_t>(offset);
  b.write = is_write;
  b.writethrough = writethrough;
  b.flush_interval = flush_interval;
  b.drain_on_flush = drain_on_flush;
  std::printf("Sending %d %s requests, %d bytes each, %d in parallel (starting at offset %" PRId64
              ", step size %d)\n",
              static_cast<int>(count), is_write ? "write" : "read", static_cast<int>(bufsize),
              static_cast<int>(depth), offset, static_cast<int>(b.step));
  if (flush_interval != 0) {
    std::printf("Sending flush every %d requests\n", static_cast<int>(flush_interval));
  }
  // One buffer per queue slot, filled with the pattern (qemu-img bench's data.buf).
  const int64_t slots = std::min(depth, count);
  b.buffers.assign(static_cast<size_t>(slots),
                   std::vector<uint8_t>(b.bufsize, static_cast<uint8_t>(pattern)));
  for (int64_t i = slots; i > 0; --i) {
    b.free_buffers.push_back(static_cast<size_t>(i - 1));
  }
  double seconds = 0;
  image->session->loop().block_on(bench_run(b, seconds));
  if (!b.error.empty()) {
    report(b.error);
    return 1;
  }
  std::printf("Run completed in %3.3f seconds.\n", seconds);
  if (is_write) {
    // Like blk_unref at the end of qemu-img bench: cached metadata reaches the image.
    Result<void> flushed = image->session->loop().block_on(block::io::flush(*image->node));
    if (!flushed) {
      report("Failed to flush the image: " + errno_text(flushed.error()));
      return 1;
    }
  }
  return 0;
}

}  // namespace strata::cli::img
