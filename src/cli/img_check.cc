// `strata img check`: qemu-img check's options, output (human and JSON) and exit codes over the
// read-only qcow2 checker. Repair (-r) is not implemented: it is refused before the image is
// opened.

#include <getopt.h>

#include <cinttypes>
#include <cstdio>
#include <string>

#include "base/qemu_json.h"
#include "block/drivers/qcow2/check.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptOutput = 256, kOptImageOpts, kOptObject };

void dump_human(const block::qcow2::CheckResult& check) {
  if (check.corruptions == 0 && check.leaks == 0 && check.check_errors == 0) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (check.corruptions != 0) {
      std::printf(
          "\n%" PRIu64
          " errors were found on the image.\nData may be corrupted, or further writes to the "
          "image may corrupt it.\n",
          check.corruptions);
    }
    if (check.leaks != 0) {
      std::printf("\n%" PRIu64
                  " leaked clusters were found on the image.\nThis means waste of disk space, "
                  "but no harm to data.\n",
                  check.leaks);
    }
    if (check.check_errors != 0) {
      std::printf("\n%" PRIu64 " internal errors have occurred during the check.\n",
                  check.check_errors);
    }
  }
  if (check.total_clusters != 0 && check.allocated_clusters != 0) {
    const double allocated = static_cast<double>(check.allocated_clusters);
    std::printf("%" PRIu64 "/%" PRIu64
                " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
                check.allocated_clusters, check.total_clusters,
                allocated * 100.0 / static_cast<double>(check.total_clusters),
                static_cast<double>(check.fragmented_clusters) * 100.0 / allocated,
                static_cast<double>(check.compressed_clusters) * 100.0 / allocated);
  }
  if (check.image_end_offset != 0) {
    std::printf("Image end offset: %" PRIu64 "\n", check.image_end_offset);
  }
}

// QEMU's ImageCheck: optional members only when non-zero.
nlohmann::json image_check_json(const block::qcow2::CheckResult& check, const std::string& filename,
                                const std::string& format) {
  nlohmann::json json = {
      {"filename", filename}, {"format", format}, {"check-errors", check.check_errors}};
  auto optional = [&](const char* key, uint64_t value) {
    if (value != 0) {
      json[key] = value;
    }
  };
  optional("image-end-offset", check.image_end_offset);
  optional("corruptions", check.corruptions);
  optional("leaks", check.leaks);
  optional("total-clusters", check.total_clusters);
  optional("allocated-clusters", check.allocated_clusters);
  optional("fragmented-clusters", check.fragmented_clusters);
  optional("compressed-clusters", check.compressed_clusters);
  return json;
}

}  // namespace

int check_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"format", required_argument, nullptr, 'f'},
      {"repair", required_argument, nullptr, 'r'},
      {"output", required_argument, nullptr, kOptOutput},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"force-share", no_argument, nullptr, 'U'},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  std::optional<std::string> output;
  std::optional<std::string> repair;
  bool quiet = false;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hf:r:T:qU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img check [-f FMT] [--output=human|json] [-q] [-U] [--image-opts] "
            "FILENAME\n");
        return 0;
      case 'f':
        request.format = optarg;
        break;
      case 'r':
        if (std::string(optarg) != "leaks" && std::string(optarg) != "all") {
          report(std::string("--repair (-r) expects 'leaks' or 'all' not '") + optarg + "'");
          std::fprintf(stderr, "Try 'strata img check --help' for more info\n");
          return 1;
        }
        repair = optarg;
        break;
      case kOptOutput:
        output = optarg;
        break;
      case 'T':
        break;  // the cache mode does not matter for a read-only check
      case 'q':
        quiet = true;
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case kOptObject:
        report("--object is not supported by strata img");
        return 1;
      case ':':
        return error_exit(std::string("argument ") + argv[optind - 1] + " requires a value");
      default:
        return error_exit(std::string("Unknown option '") + argv[optind - 1] + "'");
    }
  }
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  const std::string filename = argv[optind];
  bool json = false;
  if (output && *output == "json") {
    json = true;
  } else if (output && *output != "human") {
    report("--output must be used with human or json as argument.");
    return 1;
  }
  if (repair) {
    report("Repair (-r " + *repair + ") is not supported by strata img check yet");
    return 1;
  }
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  auto& session = image->session;
  block::Node* opened_node = image->node;
  block::Node& node = *opened_node;
  block::Node* file = nullptr;
  if (std::string_view(node.driver_name()) == "qcow2") {
    for (const auto& child : node.children()) {
      if (child->name() == "file") {
        file = child->node();
      }
    }
  }
  if (file == nullptr) {
    report("This image format does not support checks");
    return 63;
  }
  auto checked = session->loop().block_on(block::qcow2::check_image(*file));
  if (!checked) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: Check failed: %s\n", kProgram, errno_text(checked.error()).c_str());
    return 1;
  }
  const block::qcow2::CheckResult& check = *checked;
  std::fflush(stdout);
  for (const auto& line : check.messages) {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  if (!quiet) {
    if (json) {
      std::printf("%s\n",
                  qemu_json(image_check_json(check, filename, node.format_name()), true).c_str());
    } else {
      dump_human(check);
    }
  }
  if (check.check_errors != 0) {
    report("Check failed");
    return 1;
  }
  if (check.corruptions != 0) {
    return 2;
  }
  return check.leaks != 0 ? 3 : 0;
}

}  // namespace strata::cli::img
