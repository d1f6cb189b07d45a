// `strata img commit`: qemu-img commit. Everything the image and the images between it and the
// base (its backing file, or -b BASE further down the chain) hold is written into the base: data
// as data, zero clusters as write-zeroes, for each range the topmost layer that has it. Then,
// unless -d or -b, the image is emptied so that it reads through to the base again.
//
// The chain is opened layer by layer without backing files (read-only, each image alone), the
// base read-write with its own backing chain, so no image is open twice with conflicting
// permissions.

#include <getopt.h>
#include <limits.h>
#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "block/drivers/qcow2/qcow2_node.h"
#include "block/io/request.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptObject = 256, kOptImageOpts };

constexpr uint64_t kChunkBytes = 2 * 1024 * 1024;

std::string dirname_of(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

std::optional<std::string> real_path(const std::string& path) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) {
    return std::nullopt;
  }
  return std::string(resolved);
}

struct Layer {
  block::Node* node = nullptr;
  std::string path;         // as opened (resolved against the overlay's directory)
  std::string stored_name;  // as the overlay's header names it ("" for the top image)
  std::string format;
};

// Copies into `base` what `layers` (top first, all above the base) hold. Reports errors.
aio::Task<bool> copy_into_base(const std::vector<Layer>& layers, block::Node& base, bool progress) {
  block::Node& top = *layers.front().node;
  const uint64_t size = top.length();
  std::vector<uint8_t> buffer(kChunkBytes);
  auto print = [&](double percent) {
    if (progress) {
      std::printf("    (%3.2f/100%%)\r", percent);
      std::fflush(stdout);
    }
  };
  print(0);
  uint64_t n = 0;
  for (uint64_t offset = 0; offset < size; offset += n) {
    n = std::min(kChunkBytes, size - offset);
    bool found = false;
    for (const Layer& layer : layers) {
      if (offset >= layer.node->length()) {
        // A shorter intermediate image reads as zeroes past its end (QEMU counts that as
        // allocated, hiding what lies below).
        if (layer.node != &top) {
          Result<void> zeroed = co_await block::io::pwrite_zeroes(base, offset, n, 0);
          if (!zeroed) {
            report("Error while committing: " + errno_text(zeroed.error()));
            co_return false;
          }
          found = true;
          break;
        }
        continue;
      }
      n = std::min(n, layer.node->length() - offset);
      Result<block::BlockStatus> status = co_await block::io::block_status(*layer.node, offset, n);
      if (!status) {
        report("Error while committing: " + errno_text(status.error()));
        co_return false;
      }
      n = std::min(n, status->bytes);
      if ((status->flags & block::BlockStatus::kAllocated) == 0) {
        continue;
      }
      found = true;
      Result<void> copied = ok();
      if ((status->flags & block::BlockStatus::kData) == 0) {
        copied = co_await block::io::pwrite_zeroes(base, offset, n, 0);
      } else {
        copied = co_await block::io::pread(*layer.node, offset, buffer.data(), n);
        if (copied) {
          copied = co_await block::io::pwrite(base, offset, buffer.data(), n);
        }
      }
      if (!copied) {
        report("Error while committing: " + errno_text(copied.error()));
        co_return false;
      }
      break;
    }
    (void)found;
    print(static_cast<double>(offset + n) * 100.0 / static_cast<double>(size));
  }
  Result<void> flushed = co_await block::io::flush(base);
  if (!flushed) {
    report("Error while committing: " + errno_text(flushed.error()));
    co_return false;
  }
  print(100);
  co_return true;
}

}  // namespace

int commit_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {nullptr, 0, nullptr, 0},
  };
  std::optional<std::string> format;
  std::optional<std::string> base_name;
  bool keep = false;
  bool progress = false;
  bool quiet = false;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":f:ht:b:dpqr:", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img commit [-f FMT] [-b BASE] [-d] [-p] [-q] [--image-opts] "
            "FILENAME\n");
        return 0;
      case 'f':
        format = optarg;
        break;
      case 't':
        break;  // cache mode: strata's image I/O is the same either way
      case 'b':
        base_name = optarg;
        keep = true;  // -b implies -d: the images above the base stay valid
        break;
      case 'd':
        keep = true;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 'r': {
        auto rate = parse_size(optarg);
        if (!rate) {
          report(std::string("Invalid rate limit specified: '") + optarg + "'.");
          return 1;
        }
        break;  // commit runs unthrottled
      }
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
    progress = false;
  }
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  const std::string filename = argv[optind];

  ImageOpenRequest request;
  request.format = format;
  request.read_only = false;
  request.discard_unmap = true;  // BDRV_O_UNMAP
  request.no_backing = true;
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  BlockSession& session = *image->session;

  // The chain, each image opened alone, until the base.
  std::vector<Layer> layers;
  layers.push_back({image->node, image->node->exact_filename().value_or(filename), "", ""});
  std::optional<size_t> base_index;
  for (;;) {
    const auto backing = layers.back().node->backing_file_name();
    if (!backing) {
      break;
    }
    Layer layer;
    layer.path = backing->full_name;
    layer.stored_name = backing->name;
    layer.format = backing->format;
    ImageOpenRequest layer_request;
    layer_request.filename = layer.path;
    if (!layer.format.empty()) {
      layer_request.format = layer.format;
    }
    layer_request.no_backing = true;
    auto opened = session.open(layer_request);
    if (!opened) {
      report("Could not open backing file '" + layer.path + "': " + opened.error().message());
      return 1;
    }
    layer.node = *opened;
    layer.format = layer.node->format_name();
    const std::string overlay_dir = dirname_of(layers.back().path);
    layers.push_back(layer);
    if (!base_name) {
      base_index = 1;
      break;
    }
    // QEMU's bdrv_find_backing_image: the name as the overlay stores it, or the same file.
    const std::string candidate =
        !base_name->empty() && (*base_name)[0] == '/' ? *base_name : overlay_dir + *base_name;
    const auto wanted = real_path(candidate);
    const auto actual = real_path(layer.path);
    if (*base_name == layer.stored_name || (wanted && actual && *wanted == *actual)) {
      base_index = layers.size() - 1;
      break;
    }
  }
  if (!base_index) {
    if (base_name) {
      report("Did not find '" + *base_name + "' in the backing chain of '" + filename + "'");
    } else {
      report("Image does not have a backing file");
    }
    return 1;
  }

  // The base, read-write with its own backing chain (for COW of partial clusters).
  const Layer base_layer = layers[*base_index];
  session.close(*base_layer.node);
  layers.resize(*base_index);
  ImageOpenRequest base_request;
  base_request.filename = base_layer.path;
  base_request.format = base_layer.format;
  base_request.read_only = false;
  auto base = session.open(base_request);
  if (!base) {
    report("Could not open '" + base_layer.path + "': " + base.error().message());
    return 1;
  }
  // QEMU's commit grows a base that is smaller than the image (bdrv_commit / commit job).
  const uint64_t top_length = layers.front().node->length();
  if ((*base)->length() < top_length) {
    Result<void> grown = session.add_perm(**base, block::kPermResize);
    if (grown) {
      grown = session.loop().block_on(block::io::truncate(**base, top_length, false));
    }
    if (!grown) {
      report("Could not resize '" + base_layer.path + "': " + grown.error().message());
      return 1;
    }
  }
  if (!session.loop().block_on(copy_into_base(layers, **base, progress))) {
    return 1;
  }
  if (!keep) {
    auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(image->node);
    Result<void> emptied =
        qcow2 != nullptr
            ? session.loop().block_on(qcow2->make_empty())
            : Result<void>(Error(ErrorKind::kUnsupported, "Operation not supported", ENOTSUP));
    if (!emptied) {
      report("Image committed, but emptying it failed: " + errno_text(emptied.error()));
      return 1;
    }
  }
  if (progress) {
    std::printf("\n");
  }
  if (!quiet) {
    std::printf("Image committed.\n");
  }
  return 0;
}

}  // namespace strata::cli::img
