// `strata img amend`: qemu-img amend for qcow2 images: compat (0.10/v2, 1.1/v3, both
// directions), lazy_refcounts, refcount_bits (the refcount structure is rebuilt), data_file (the
// stored name) and data_file_raw (cleared); size only when unchanged. Option parsing, messages and
// exit codes are qemu-img's.

#include <getopt.h>

#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "block/drivers/qcow2/qcow2_node.h"
#include "block/graph/permissions.h"
#include "block/io/request.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptObject = 256, kOptImageOpts, kOptForce };

// The qcow2 creation options qemu-img amend rejects as creation-only.
bool creation_only(const std::string& name) {
  return name == "cluster_size" || name == "preallocation" || name == "compression_type" ||
         name == "extended_l2" || name == "encryption";
}

}  // namespace

int amend_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"force", no_argument, nullptr, kOptForce},
      {nullptr, 0, nullptr, 0},
  };
  std::vector<std::string> option_texts;
  std::optional<std::string> format;
  bool progress = false;
  bool quiet = false;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":ho:f:t:pq", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img amend [-f FMT] [-p] [-q] [-t CACHE] [--image-opts] -o OPTIONS "
            "FILENAME\n");
        return 0;
      case 'o':
        option_texts.emplace_back(optarg);
        break;
      case 'f':
        format = optarg;
        break;
      case 't':
        break;  // cache mode: strata's image I/O is the same either way
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case kOptForce:
        break;  // only matters for encryption changes, which strata does not support
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
  if (option_texts.empty()) {
    report("Must specify options (-o)");
    std::fprintf(stderr, "Try 'strata img amend --help' for more info\n");
    return 1;
  }
  if (quiet) {
    progress = false;
  }
  if (optind != argc - 1) {
    report("Expecting one image file name");
    return 1;
  }
  const std::string filename = argv[optind];
  auto print_progress = [&](double percent) {
    if (progress) {
      std::printf("    (%3.2f/100%%)\r", percent);
      std::fflush(stdout);
    }
  };
  print_progress(0);

  ImageOpenRequest request;
  request.format = format;
  request.read_only = false;
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(image->node);
  if (qcow2 == nullptr) {
    report(std::string("Format driver '") + image->node->format_name() +
           "' does not support option amendment");
    return 1;
  }

  block::qcow2::Qcow2Node::AmendOptions amend;
  std::optional<uint64_t> new_size;
  auto items = split_options(option_texts);
  if (!items) {
    report(items.error().message());
    return 1;
  }
  for (const auto& [name, value] : *items) {
    if (name == "compat") {
      if (value == "0.10" || value == "v2") {
        amend.version = 2;
      } else if (value == "1.1" || value == "v3") {
        amend.version = 3;
      } else {
        report("Unknown compatibility level " + value);
        return 1;
      }
    } else if (name == "lazy_refcounts") {
      // A bare key (empty value) switches the boolean on, as QEMU's qemu_opts_parse does.
      if (value.empty() || value == "on" || value == "yes" || value == "true") {
        amend.lazy_refcounts = true;
      } else if (value == "off" || value == "no" || value == "false") {
        amend.lazy_refcounts = false;
      } else {
        report("Parameter 'lazy_refcounts' expects 'on' or 'off'");
        return 1;
      }
    } else if (name == "refcount_bits") {
      auto bits = parse_size(value);
      if (!bits) {
        report("Parameter 'refcount_bits' expects a number");
        return 1;
      }
      amend.refcount_bits = *bits;
    } else if (name == "size") {
      auto size = parse_size(value);
      if (!size) {
        report("Parameter 'size' expects a non-negative number below 2^64");
        std::fprintf(stderr,
                     "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                     "and exabytes, respectively.\n");
        return 1;
      }
      new_size = *size;
    } else if (name == "backing_file" || name == "backing_fmt") {
      report("Cannot amend the backing file");
      std::fprintf(stderr, "You can use 'qemu-img rebase' instead.\n");
      return 1;
    } else if (name == "data_file") {
      amend.data_file = value;
    } else if (name == "data_file_raw") {
      if (value.empty() || value == "on" || value == "yes" || value == "true") {
        amend.data_file_raw = true;
      } else if (value == "off" || value == "no" || value == "false") {
        amend.data_file_raw = false;
      } else {
        report("Parameter 'data_file_raw' expects 'on' or 'off'");
        return 1;
      }
    } else if (name.rfind("encrypt.", 0) == 0) {
      report("Amending '" + name + "' is not supported by strata img amend");
      return 1;
    } else if (creation_only(name)) {
      report("Invalid parameter '" + name + "'");
      std::fprintf(stderr, "This option is only supported for image creation\n");
      return 1;
    } else {
      report("Invalid parameter '" + name + "'");
      return 1;
    }
  }
  Result<void> amended = image->session->loop().block_on(qcow2->amend(amend));
  if (amended && new_size && *new_size != image->node->length()) {
    // QEMU's qcow2_amend_options ends with an exact blk_truncate (preallocation off).
    amended = image->session->add_perm(*image->node, block::kPermResize);
    if (amended) {
      amended = image->session->loop().block_on(
          block::io::truncate(*image->node, *new_size, /*exact=*/true));
    }
  }
  if (amended) {
    amended = image->session->loop().block_on(block::io::flush(*image->node));
  }
  if (!amended) {
    report(amended.error().message());
    if (progress) {
      std::printf("\n");
    }
    return 1;
  }
  print_progress(100);
  if (progress) {
    std::printf("\n");
  }
  return 0;
}

}  // namespace strata::cli::img
