// `strata img map`: qemu-img map's entries (qemu-img.c img_map, dump_map_entry).

#include <getopt.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <string>

#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptOutput = 256, kOptImageOpts, kOptStartOffset, kOptMaxLength, kOptObject };

struct MapEntry {
  uint64_t start = 0;
  ChainStatus status;
};

bool mergeable(const MapEntry& current, const MapEntry& next) {
  const ChainStatus& a = current.status;
  const ChainStatus& b = next.status;
  if (a.bytes == 0) {
    return false;
  }
  if (a.zero != b.zero || a.data != b.data || a.depth != b.depth || a.present != b.present ||
      a.compressed != b.compressed || a.filename.has_value() != b.filename.has_value() ||
      a.has_offset != b.has_offset) {
    return false;
  }
  if (a.filename && *a.filename != *b.filename) {
    return false;
  }
  if (a.has_offset && a.offset + a.bytes != b.offset) {
    return false;
  }
  return true;
}

// Prints one entry; false when the human format cannot express it.
bool dump_entry(bool json, const MapEntry& entry, MapEntry* next) {
  const ChainStatus& e = entry.status;
  if (!json) {
    if (e.data && !e.has_offset) {
      report("File contains external, encrypted or compressed clusters.");
      return false;
    }
    if (e.data && !e.zero) {
      char start[32];
      char length[32];
      char offset[32];
      std::snprintf(start, sizeof(start), "%#" PRIx64, entry.start);
      std::snprintf(length, sizeof(length), "%#" PRIx64, e.bytes);
      std::snprintf(offset, sizeof(offset), "%#" PRIx64, e.has_offset ? e.offset : 0);
      std::printf("%-16s%-16s%-16s%s\n", start, length, offset,
                  e.filename ? e.filename->c_str() : "");
    }
    // The human format ignores the difference between zero and zero-with-data.
    if (next != nullptr && (!next->status.data || next->status.zero)) {
      next->status.data = false;
      next->status.zero = true;
    }
    return true;
  }
  std::printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
              ", \"depth\": %d,"
              " \"present\": %s, \"zero\": %s, \"data\": %s, \"compressed\": %s",
              entry.start, e.bytes, e.depth, e.present ? "true" : "false",
              e.zero ? "true" : "false", e.data ? "true" : "false",
              e.compressed ? "true" : "false");
  if (e.has_offset) {
    std::printf(", \"offset\": %" PRIu64, e.offset);
  }
  std::putchar('}');
  if (next != nullptr) {
    std::puts(",");
  }
  return true;
}

aio::Task<int> run_map(block::Node& node, bool json, uint64_t start_offset, uint64_t end) {
  MapEntry current;
  current.start = start_offset;
  while (current.start + current.status.bytes < end) {
    MapEntry next;
    next.start = current.start + current.status.bytes;
    // Probes at most 1 GiB at a time, as qemu-img does.
    uint64_t bytes = std::min<uint64_t>(uint64_t{1} << 30, end - next.start);
    Result<ChainStatus> status = co_await chain_status(node, next.start, bytes);
    if (!status) {
      report("Could not read file metadata: " + errno_text(status.error()));
      co_return 1;
    }
    next.status = *status;
    if (mergeable(current, next)) {
      current.status.bytes += next.status.bytes;
      continue;
    }
    if (current.status.bytes > 0 && !dump_entry(json, current, &next)) {
      co_return 1;
    }
    current = next;
  }
  if (!dump_entry(json, current, nullptr)) {
    co_return 1;
  }
  co_return 0;
}

}  // namespace

int map_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"format", required_argument, nullptr, 'f'},
      {"output", required_argument, nullptr, kOptOutput},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"object", required_argument, nullptr, kOptObject},
      {"force-share", no_argument, nullptr, 'U'},
      {"start-offset", required_argument, nullptr, kOptStartOffset},
      {"max-length", required_argument, nullptr, kOptMaxLength},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  std::string output = "human";
  bool image_opts = false;
  uint64_t start_offset = 0;
  std::optional<uint64_t> max_length;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":f:hU", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img map [-f FMT] [--output=human|json] [-U] [--image-opts] "
            "[--start-offset=OFF] [--max-length=LEN] FILENAME\n");
        return 0;
      case 'f':
        request.format = optarg;
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptOutput:
        output = optarg;
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case kOptStartOffset:
      case kOptMaxLength: {
        auto value = parse_size(optarg);
        if (!value || *value > static_cast<uint64_t>(INT64_MAX)) {
          report(std::string("Invalid ") + (c == kOptStartOffset ? "start offset" : "max length") +
                 " specified: '" + optarg + "'.");
          return 1;
        }
        if (c == kOptStartOffset) {
          start_offset = *value;
        } else {
          max_length = *value;
        }
        break;
      }
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  if (optind != argc - 1) {
    return error_exit("Expecting one image file name");
  }
  if (output != "human" && output != "json") {
    return error_exit("--output must be used with human or json as argument.");
  }
  std::string filename = argv[optind];
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  auto& session = image->session;
  block::Node* opened_node = image->node;
  block::Node& node = *opened_node;
  const bool json = output == "json";
  if (json) {
    std::putchar('[');
  } else {
    std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  }
  uint64_t length = node.length();
  uint64_t end = length;
  if (max_length) {
    end = std::min(length, start_offset + *max_length);
  }
  int rc = session->loop().block_on(run_map(node, json, start_offset, end));
  if (json) {
    std::puts("]");
  }
  return rc;
}

}  // namespace strata::cli::img
