// `strata img check`: qemu-img check's options, output (human and JSON) and exit codes over the
// qcow2 checker, with repair (-r leaks|all) as qemu-img does it: the first pass repairs, and when
// it fixed anything a second, read-only pass reports the state of the repaired image.

#include <getopt.h>

#include <cinttypes>
#include <cstdio>
#include <string>

#include "base/qemu_json.h"
#include "block/drivers/qcow2/check.h"
#include "block/drivers/qcow2/repair.h"
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
  optional("corruptions-fixed", check.corruptions_fixed);
  optional("leaks-fixed", check.leaks_fixed);
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
            "usage: strata img check [-f FMT] [--output=human|json] [-q] [-U] [-r leaks|all] "
            "[--image-opts] FILENAME\n");
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
  const std::string filename = argv[optind];
  bool json = false;
  if (output && *output == "json") {
    json = true;
  } else if (output && *output != "human") {
    report("--output must be used with human or json as argument.");
    return 1;
  }
  uint32_t fix = 0;
  if (repair) {
    fix = *repair == "all" ? (block::qcow2::kFixLeaks | block::qcow2::kFixErrors)
                           : block::qcow2::kFixLeaks;
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
  const std::string format = node.format_name();
  // Repair writes the image file beneath the qcow2 driver (QEMU opens it with BDRV_O_CHECK, which
  // skips the dirty-bit repair and the corrupt-bit refusal of a read-write open): the format was
  // validated by the read-only open above; now only its file is opened, read-write.
  std::optional<OpenedImage> writable;
  if (fix != 0) {
    ImageOpenRequest file_request;
    file_request.image_opts = qemu_json(file->full_options(), false);
    file_request.read_only = false;
    file_request.force_share = request.force_share;
    file_request.discard_unmap = true;  // freed clusters are discarded, as QEMU does
    image.reset();
    writable = open_image_or_report(file_request, *file_request.image_opts, true);
    if (!writable) {
      return 1;
    }
    file = writable->node;
  }
  auto& loop = writable ? writable->session->loop() : session->loop();
  auto print_message = [](const std::string& line, bool program_prefixed) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s%s%s\n", program_prefixed ? kProgram : "", program_prefixed ? ": " : "",
                 line.c_str());
  };
  auto checked = loop.block_on(block::qcow2::check_image(*file, fix, print_message));
  if (checked && (checked->corruptions_fixed != 0 || checked->leaks_fixed != 0)) {
    if (!quiet && !json) {
      std::printf(
          "The following inconsistencies were found and repaired:\n\n"
          "    %" PRIu64
          " leaked clusters\n"
          "    %" PRIu64
          " corruptions\n\n"
          "Double checking the fixed image now...\n",
          checked->leaks_fixed, checked->corruptions_fixed);
    }
    const uint64_t leaks_fixed = checked->leaks_fixed;
    const uint64_t corruptions_fixed = checked->corruptions_fixed;
    checked = loop.block_on(block::qcow2::check_image(*file, 0, print_message));
    if (checked) {
      checked->leaks_fixed = leaks_fixed;
      checked->corruptions_fixed = corruptions_fixed;
    }
  }
  if (!checked) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: Check failed: %s\n", kProgram, errno_text(checked.error()).c_str());
    return 1;
  }
  const block::qcow2::CheckResult& check = *checked;
  std::fflush(stdout);
  if (!quiet) {
    if (json) {
      std::printf("%s\n", qemu_json(image_check_json(check, filename, format), true).c_str());
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
