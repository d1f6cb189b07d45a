// `strata img resize`: qemu-img resize's options, texts and exit codes (grow, shrink with
// --shrink, relative sizes) for raw and qcow2, through the node's co_truncate.

#include <getopt.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "block/drivers/qcow2/qcow2_node.h"
#include "block/graph/permissions.h"
#include "block/io/request.h"
#include "cli/commands.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptObject = 256, kOptImageOpts, kOptPreallocation, kOptShrink };

bool known_preallocation(const std::string& mode) {
  return mode == "off" || mode == "metadata" || mode == "falloc" || mode == "full";
}

block::qcow2::Preallocation qcow2_preallocation(const std::string& mode) {
  using block::qcow2::Preallocation;
  if (mode == "metadata") {
    return Preallocation::kMetadata;
  }
  return mode == "falloc" ? Preallocation::kFalloc : Preallocation::kFull;
}

// file-posix's truncate with preallocation, after the file grew from `from` to `to`: falloc
// allocates the new area, full writes zeroes into it.
Result<void> preallocate_new_area(aio::EventLoop& loop, block::Node& node, uint64_t from,
                                  uint64_t to, const std::string& mode) {
  if (mode == "falloc") {
    return fallocate_plain_file(node, from, to - from);
  }
  constexpr uint64_t kZeroChunk = 1 << 20;
  const std::vector<uint8_t> zeroes(kZeroChunk, 0);
  for (uint64_t offset = from; offset < to; offset += kZeroChunk) {
    const uint64_t bytes = std::min(kZeroChunk, to - offset);
    Result<void> written = loop.block_on(block::io::pwrite(node, offset, zeroes.data(), bytes));
    if (!written) {
      return Error::from_errno(written.error().errno_value(),
                               "Could not write zeros for preallocation");
    }
  }
  return ok();
}

}  // namespace

int resize_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"preallocation", required_argument, nullptr, kOptPreallocation},
      {"shrink", no_argument, nullptr, kOptShrink},
      {"force-share", no_argument, nullptr, 'U'},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  request.read_only = false;
  bool image_opts = false;
  bool quiet = false;
  bool shrink = false;
  std::string preallocation = "off";
  // qemu-img 10 takes operands in order (getopt's "-" mode): the file name, then the size. A
  // size right after the file name may be negative ("-1G"); anywhere else it needs "--".
  std::optional<std::string> filename;
  std::optional<std::string> size_text;
  bool extra_operands = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, "-:f:hqU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 1:
        if (!filename) {
          filename = optarg;
          if (optind < argc && argv[optind][0] == '-' &&
              std::isdigit(static_cast<unsigned char>(argv[optind][1]))) {
            size_text = argv[optind++];
          }
        } else if (!size_text) {
          size_text = optarg;
        } else {
          extra_operands = true;
        }
        break;
      case 'h':
        std::printf(
            "usage: strata img resize [-f FMT] [--preallocation=off] [--shrink] [-q] [-U] "
            "[--image-opts] FILENAME [+|-]SIZE\n");
        return 0;
      case 'f':
        request.format = optarg;
        break;
      case 'q':
        quiet = true;
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case kOptShrink:
        shrink = true;
        break;
      case kOptPreallocation:
        preallocation = optarg;
        if (!known_preallocation(preallocation)) {
          report("Invalid preallocation mode '" + preallocation + "'");
          return 1;
        }
        break;
      case ':':
        return missing_argument(argv[optind - 1]);
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  for (; optind < argc; ++optind) {  // operands after "--"
    if (!filename) {
      filename = argv[optind];
    } else if (!size_text) {
      size_text = argv[optind];
    } else {
      extra_operands = true;
    }
  }
  if (extra_operands) {
    return error_exit("Extra argument(s) in command line");
  }
  if (!filename || !size_text) {
    return error_exit("Expecting image file name and size");
  }
  int relative = 0;
  std::string_view number = *size_text;
  if (!number.empty() && (number[0] == '+' || number[0] == '-')) {
    relative = number[0] == '+' ? 1 : -1;
    number.remove_prefix(1);
  }
  Result<uint64_t> parsed = parse_size(number);
  if (!parsed) {
    report(
        "Parameter 'size' expects a non-negative number below 2^64\n"
        "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
        "and exabytes, respectively.");
    return 1;
  }
  auto image = open_image_or_report(request, *filename, image_opts);
  if (!image) {
    return 1;
  }
  block::Node& node = *image->node;
  aio::EventLoop& loop = image->session->loop();
  const int64_t current = static_cast<int64_t>(node.length());
  int64_t total = static_cast<int64_t>(*parsed);
  if (relative != 0) {
    total = current + relative * static_cast<int64_t>(*parsed);
  }
  if (total <= 0) {
    report("New image size must be positive");
    return 1;
  }
  if (total <= current && preallocation != "off") {
    report("Preallocation can only be used for growing images");
    return 1;
  }
  if (total < current && !shrink) {
    report("Use the --shrink option to perform a shrink operation.");
    report(
        "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
        "Before performing such an operation, make sure there is no important data there.");
    return 1;
  }
  // Raw images over a plain file take falloc and full like file-posix; qcow2 takes all three
  // modes (Qcow2Node::preallocate_growth).
  const bool raw_file = is_plain_file(node);
  auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(&node);
  if (preallocation != "off" && qcow2 == nullptr && (!raw_file || preallocation == "metadata")) {
    if (raw_file) {
      report("Unsupported preallocation mode: " + preallocation);
    } else {
      report("Preallocation mode '" + preallocation + "' is not supported by the " +
             node.driver_name() + " driver");
    }
    return 1;
  }
  Result<void> permitted = image->session->add_perm(node, block::kPermResize);
  if (!permitted) {
    report(permitted.error().message());
    return 1;
  }
  Result<void> resized =
      loop.block_on(block::io::truncate(node, static_cast<uint64_t>(total), /*exact=*/true));
  if (resized && preallocation != "off" && qcow2 != nullptr) {
    resized = loop.block_on(qcow2->preallocate_growth(static_cast<uint64_t>(current),
                                                      static_cast<uint64_t>(total),
                                                      qcow2_preallocation(preallocation)));
  } else if (resized && preallocation != "off") {
    resized = preallocate_new_area(loop, node, static_cast<uint64_t>(current),
                                   static_cast<uint64_t>(total), preallocation);
  }
  if (resized) {
    resized = loop.block_on(block::io::flush(node));
  }
  if (!resized) {
    report(resized.error().message());
    return 1;
  }
  if (!quiet) {
    std::printf("Image resized.\n");
  }
  return 0;
}

}  // namespace strata::cli::img
