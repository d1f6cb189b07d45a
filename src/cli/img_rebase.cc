// `strata img rebase`: qemu-img rebase. Safe mode (the default) reads the old and the new backing
// file wherever the image has no data of its own and copies into the image every write_align-sized
// chunk where they differ, then records the new backing file; unsafe mode (-u) only changes the
// name in the header. `-b ''` removes the backing file (the data it provided is copied in first).

#include <getopt.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "block/drivers/driver.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "block/drivers/remote_url.h"
#include "block/io/request.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptObject = 256, kOptImageOpts };

// qemu-img's IO_BUF_SIZE.
constexpr uint64_t kBufferBytes = 2 * 1024 * 1024;

// qemu-img's progress for -p (util/qemu-progress.c with a 2% minimum step): print(delta, 0)
// sets the percentage, print(delta, max) adds delta * max / 100; a line is printed when the value
// moved by more than the step, or is 0 or 100.
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled) {}
  void print(float delta, int max) {
    float current = max == 0 ? delta : current_ + delta / 100 * static_cast<float>(max);
    current = std::min(current, 100.0f);
    current_ = current;
    if (current > last_print_ + kMinSkip || current < last_print_ - kMinSkip || current == 0 ||
        current == 100) {
      last_print_ = current_;
      if (enabled_) {
        std::printf("    (%3.2f/100%%)\r", static_cast<double>(current_));
        std::fflush(stdout);
      }
    }
  }
  void end() {
    if (enabled_) {
      std::printf("\n");
    }
  }

 private:
  static constexpr float kMinSkip = 2.0f;
  bool enabled_;
  float current_ = 0;
  float last_print_ = 0;
};

// qemu-img's compare_buffers: whether the first `chunk` bytes differ, and how many bytes (whole
// chunks) from the start share that status.
bool compare_buffers(const uint8_t* a, const uint8_t* b, uint64_t bytes, uint64_t chunk,
                     uint64_t& same_status) {
  const uint64_t first = std::min(chunk, bytes);
  const bool differ = std::memcmp(a, b, first) != 0;
  uint64_t at = first;
  while (at < bytes) {
    const uint64_t len = std::min(chunk, bytes - at);
    if ((std::memcmp(a + at, b + at, len) != 0) != differ) {
      break;
    }
    at += len;
  }
  same_status = at;
  return differ;
}

// The guest bytes of `node` at [offset, offset + bytes) that lie before `length`; zeroes after.
aio::Task<Result<void>> read_padded(block::Node* node, uint64_t node_length, uint64_t offset,
                                    uint8_t* buffer, uint64_t bytes) {
  const uint64_t readable =
      node == nullptr || offset >= node_length ? 0 : std::min(bytes, node_length - offset);
  std::memset(buffer + readable, 0, bytes - readable);
  if (readable > 0) {
    Result<void> read = co_await block::io::pread(*node, offset, buffer, readable);
    if (!read) {
      co_return read;
    }
  }
  co_return ok();
}

struct SafeRebase {
  block::Node* image = nullptr;
  block::Node* old_backing = nullptr;
  block::Node* new_backing = nullptr;
  uint64_t write_align = 512;
  uint32_t write_flags = 0;  // -c: kRequestWriteCompressed (write_align is then the cluster size)
  Progress* progress = nullptr;
};

// qemu-img rebase's copy loop. Errors are reported here; returns false after a report.
aio::Task<bool> copy_differences(SafeRebase s) {
  const uint64_t size = s.image->length();
  const uint64_t old_size = s.old_backing != nullptr ? s.old_backing->length() : 0;
  const uint64_t new_size = s.new_backing != nullptr ? s.new_backing->length() : 0;
  const uint64_t buffer_size = std::max(kBufferBytes, s.write_align) + 2 * s.write_align;
  std::vector<uint8_t> old_data(buffer_size);
  std::vector<uint8_t> new_data(buffer_size);
  const float local_progress =
      size == 0 ? 0.0f : 100.0f / static_cast<float>(size / std::min<uint64_t>(size, kBufferBytes));
  uint64_t n = 0;
  for (uint64_t offset = 0; offset < size; offset += n) {
    n = std::min(std::max(kBufferBytes, s.write_align), size - offset);
    Result<block::BlockStatus> status = co_await block::io::block_status(*s.image, offset, n);
    if (!status) {
      report("error while reading image metadata: " + errno_text(status.error()));
      co_return false;
    }
    n = status->bytes;
    if ((status->flags & block::BlockStatus::kAllocated) != 0) {
      continue;
    }
    // Widen to whole write_align units so the writes below never need COW of partial clusters.
    const uint64_t start = offset / s.write_align * s.write_align;
    uint64_t end = (offset + n + s.write_align - 1) / s.write_align * s.write_align;
    end = std::min(end, size);
    offset = start;
    n = end - start;
    const uint64_t n_old = offset >= old_size ? 0 : std::min(n, old_size - offset);
    bool old_backing_eof = n_old == 0;
    Result<void> read = co_await read_padded(s.old_backing, old_size, offset, old_data.data(), n);
    if (!read) {
      report("error while reading from old backing file: " + errno_text(read.error()));
      co_return false;
    }
    read = co_await read_padded(s.new_backing, new_size, offset, new_data.data(), n);
    if (!read) {
      report("error while reading from new backing file: " + errno_text(read.error()));
      co_return false;
    }
    uint64_t written = 0;
    while (written < n) {
      uint64_t run = 0;
      if (compare_buffers(old_data.data() + written, new_data.data() + written, n - written,
                          s.write_align, run)) {
        // (No co_await inside ?: — GCC 12 miscompiles it.)
        Result<void> done = ok();
        if (old_backing_eof) {
          done = co_await block::io::pwrite_zeroes(*s.image, offset + written, run, 0);
        } else {
          done = co_await block::io::pwrite(*s.image, offset + written, old_data.data() + written,
                                            run, s.write_flags);
        }
        if (!done) {
          report("Error while writing to COW image: " + errno_text(done.error()));
          co_return false;
        }
      }
      written += run;
      if (offset + written >= old_size) {
        old_backing_eof = true;
      }
    }
    s.progress->print(local_progress, 100);
  }
  co_return true;
}

std::string dirname_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

}  // namespace

int rebase_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"force-share", no_argument, nullptr, 'U'},
      {"compress", no_argument, nullptr, 'c'},
      {nullptr, 0, nullptr, 0},
  };
  std::optional<std::string> format;
  std::optional<std::string> backing;
  std::optional<std::string> backing_format;
  bool unsafe = false;
  bool progress_enabled = false;
  bool quiet = false;
  bool force_share = false;
  bool compress = false;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hf:F:b:upt:T:qUc", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img rebase [-f FMT] [-F BACKING_FMT] [-b BACKING] [-u] [-p] [-q] [-U] "
            "[--image-opts] FILENAME\n");
        return 0;
      case 'f':
        format = optarg;
        break;
      case 'F':
        backing_format = optarg;
        break;
      case 'b':
        backing = optarg;
        break;
      case 'u':
        unsafe = true;
        break;
      case 'p':
        progress_enabled = true;
        break;
      case 't':
      case 'T':
        break;  // cache modes: strata's image I/O is the same either way
      case 'q':
        quiet = true;
        break;
      case 'U':
        force_share = true;
        break;
      case 'c':
        compress = true;
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
  if (quiet) {
    progress_enabled = false;
  }
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  if (!unsafe && !backing) {
    report("Must specify backing file (-b) or use unsafe mode (-u)");
    std::fprintf(stderr, "Try 'strata img rebase --help' for more info\n");
    return 1;
  }
  const std::string filename = argv[optind];
  Progress progress(progress_enabled);
  progress.print(0, 100);

  ImageOpenRequest request;
  request.format = format;
  request.read_only = false;
  request.no_backing = unsafe;
  request.force_share = force_share;
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  block::Node& node = *image->node;
  if (compress && !node.supports_compressed_writes()) {
    report("Compression not supported for this file format");
    return 1;
  }
  if (backing_format && block::find_driver(*backing_format) == nullptr) {
    report("Invalid format name: '" + *backing_format + "'");
    return 1;
  }

  if (!unsafe) {
    SafeRebase rebase;
    rebase.image = &node;
    rebase.progress = &progress;
    if (block::Child* old_backing = node.backing_child(); old_backing != nullptr) {
      rebase.old_backing = old_backing->node();
    }
    if (!backing->empty()) {
      // The new backing file, resolved against the image's directory like a stored name.
      const std::string overlay = node.exact_filename().value_or(filename);
      const std::string path =
          block::names_itself(*backing) ? *backing : dirname_of(overlay) + *backing;
      ImageOpenRequest backing_request;
      backing_request.filename = path;
      backing_request.format = backing_format;
      backing_request.force_share = force_share;
      auto opened = image->session->open(backing_request);
      if (!opened) {
        report("Could not open new backing file '" + path + "': " + opened.error().message());
        return 1;
      }
      rebase.new_backing = *opened;
    }
    if (auto cluster = node.cluster_size(); cluster && *cluster > 0) {
      rebase.write_align = *cluster;
    }
    if (compress) {
      rebase.write_flags = block::kRequestWriteCompressed;
    }
    if (!image->session->loop().block_on(copy_differences(rebase))) {
      return 1;
    }
  }

  auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(&node);
  const std::string new_name = backing.value_or("");
  Result<void> changed = ok();
  if (qcow2 == nullptr) {
    changed = Error(ErrorKind::kUnsupported, "Operation not supported", ENOTSUP);
  } else if (!new_name.empty() && !backing_format) {
    changed = Error(ErrorKind::kInvalidArgument, "Invalid argument", EINVAL);
  } else {
    changed = image->session->loop().block_on(
        qcow2->change_backing_file(new_name, new_name.empty() ? "" : *backing_format));
  }
  if (changed) {
    changed = image->session->loop().block_on(block::io::flush(node));
  }
  if (!changed) {
    const int error = changed.error().errno_value();
    if (error == ENOSPC) {
      report("Could not change the backing file to '" + new_name +
             "': No space left in the file header");
    } else if (error == EINVAL && !new_name.empty() && !backing_format) {
      report("Could not change the backing file to '" + new_name +
             "': backing format must be specified");
    } else {
      report("Could not change the backing file to '" + new_name +
             "': " + errno_text(changed.error()));
    }
    progress.end();
    return 1;
  }
  progress.print(100, 0);
  progress.end();
  return 0;
}

}  // namespace strata::cli::img
