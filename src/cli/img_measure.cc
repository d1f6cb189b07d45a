// `strata img measure`: qemu-img measure for raw and qcow2 targets (QEMU's raw_measure and
// qcow2_measure), from --size or from a source image (raw or qcow2, whose block status decides
// which clusters a converted image would need).

#include <getopt.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "block/bitmap/dirty_bitmap.h"
#include "block/drivers/qcow2/bitmaps.h"
#include "block/drivers/qcow2/format.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum { kOptImageOpts = 256, kOptObject, kOptSize, kOptOutput };

// What the -o options say about the target (qcow2_measure's parsing, QEMU's messages).
struct MeasureTarget {
  uint64_t cluster_size = 65536;
  uint32_t refcount_order = 4;
  bool extended_l2 = false;
  bool full_preallocation = false;  // falloc or full: every data cluster counts
  bool has_backing_file = false;
  uint32_t version = 3;
  std::optional<uint64_t> size;
};

uint64_t round_up(uint64_t value, uint64_t to) {
  return (value + to - 1) / to * to;
}
uint64_t div_round_up(uint64_t value, uint64_t by) {
  return (value + by - 1) / by;
}

// QEMU's qcow2_refcount_metadata_size (generous_increase false).
uint64_t refcount_metadata_size(uint64_t clusters, uint64_t cluster_size, uint32_t refcount_order) {
  const uint64_t blocks_per_table_cluster = cluster_size / 8;
  const uint64_t refcounts_per_block = cluster_size * 8 / (uint64_t{1} << refcount_order);
  uint64_t table = 0;
  uint64_t blocks = 0;
  uint64_t n = 0;
  uint64_t last = 0;
  do {
    last = n;
    blocks = div_round_up(clusters + table + blocks, refcounts_per_block);
    table = div_round_up(blocks, blocks_per_table_cluster);
    n = clusters + blocks + table;
  } while (n != last);
  return (blocks + table) * cluster_size;
}

// QEMU's qcow2_calc_prealloc_size: metadata plus data of a fully allocated image.
uint64_t calc_prealloc_size(uint64_t total_size, uint64_t cluster_size, uint32_t refcount_order,
                            bool extended_l2) {
  const uint64_t aligned_total = round_up(total_size, cluster_size);
  const uint64_t l2e_size = extended_l2 ? 16 : 8;
  uint64_t meta = cluster_size;  // header
  uint64_t nl2e = round_up(aligned_total / cluster_size, cluster_size / l2e_size);
  meta += nl2e * l2e_size;
  uint64_t nl1e = round_up(nl2e * l2e_size / cluster_size, cluster_size / 8);
  meta += nl1e * 8;
  meta +=
      refcount_metadata_size((meta + aligned_total) / cluster_size, cluster_size, refcount_order);
  return meta + aligned_total;
}

// Parses qcow2 -o options; reports QEMU's message and returns false on bad values.
bool parse_qcow2_target(const std::map<std::string, std::string>& given, MeasureTarget& target) {
  auto get = [&](const char* key) -> const std::string* {
    auto it = given.find(key);
    return it == given.end() ? nullptr : &it->second;
  };
  if (const std::string* value = get("extended_l2")) {
    if (*value != "on" && *value != "off") {
      report("Parameter 'extended_l2' expects 'on' or 'off'");
      return false;
    }
    target.extended_l2 = *value == "on";
  }
  if (const std::string* value = get("cluster_size")) {
    auto parsed = parse_size(*value);
    if (!parsed) {
      report("Parameter 'cluster_size' expects a non-negative number below 2^64");
      return false;
    }
    target.cluster_size = *parsed;
  }
  const uint64_t cs = target.cluster_size;
  if ((cs & (cs - 1)) != 0 || cs < 512 || cs > (2u << 20)) {
    report("Cluster size must be a power of two between 512 and 2048k");
    return false;
  }
  if (target.extended_l2 && cs < 16384) {
    report("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    return false;
  }
  if (const std::string* value = get("compat")) {
    if (*value == "0.10" || *value == "v2") {
      target.version = 2;
    } else if (*value == "1.1" || *value == "v3") {
      target.version = 3;
    } else {
      report("Invalid compatibility level: '" + *value + "'");
      return false;
    }
  }
  if (const std::string* value = get("refcount_bits")) {
    char* end = nullptr;
    const unsigned long long bits = std::strtoull(value->c_str(), &end, 0);
    if (value->empty() || *end != '\0' || bits == 0 || bits > 64 || (bits & (bits - 1)) != 0) {
      report("Refcount width must be a power of two and may not exceed 64 bits");
      return false;
    }
    if (target.version < 3 && bits != 16) {
      report(
          "Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
          "compat=1.1 or greater)");
      return false;
    }
    target.refcount_order = static_cast<uint32_t>(__builtin_ctzll(bits));
  }
  if (const std::string* value = get("preallocation")) {
    if (*value != "off" && *value != "metadata" && *value != "falloc" && *value != "full") {
      report("invalid parameter value: " + *value);
      return false;
    }
    target.full_preallocation = *value == "falloc" || *value == "full";
  }
  target.has_backing_file = get("backing_file") != nullptr;
  return true;
}

// The bytes of `source` a converted image must hold as data clusters (qcow2_measure's loop over
// bdrv_block_status_above: zero runs are skipped, allocated data is counted up to the end of
// its cluster, including QEMU's count of the offset into the first cluster).
aio::Task<Result<uint64_t>> required_data(block::Node& source, uint64_t cluster_size) {
  const uint64_t size = source.length();
  uint64_t required = 0;
  uint64_t pnum = 0;
  for (uint64_t offset = 0; offset < size; offset += pnum) {
    Result<ChainStatus> status = co_await chain_status(source, offset, size - offset);
    if (!status) {
      co_return std::move(status).error();
    }
    pnum = status->bytes;
    if (status->zero) {
      continue;
    }
    if (status->data && status->present) {
      pnum = round_up(offset + pnum, cluster_size) - offset;
      required += offset % cluster_size + pnum;
    }
  }
  co_return required;
}

void print_measure(bool json, uint64_t required, uint64_t fully_allocated,
                   std::optional<uint64_t> bitmaps) {
  if (json) {
    std::printf("{\n");
    if (bitmaps) {
      std::printf("    \"bitmaps\": %" PRIu64 ",\n", *bitmaps);
    }
    std::printf("    \"required\": %" PRIu64 ",\n    \"fully-allocated\": %" PRIu64 "\n}\n",
                required, fully_allocated);
    return;
  }
  std::printf("required size: %" PRIu64 "\nfully allocated size: %" PRIu64 "\n", required,
              fully_allocated);
  if (bitmaps) {
    std::printf("bitmaps size: %" PRIu64 "\n", *bitmaps);
  }
}

// QEMU's qcow2_get_persistent_dirty_bitmap_size: every persistent bitmap fully allocated in
// clusters of `cluster_size`, its table, and the directory.
uint64_t persistent_bitmaps_size(block::Node& node, uint64_t cluster_size) {
  uint64_t total = 0;
  uint64_t directory = 0;
  for (const auto& bitmap : node.dirty_bitmaps().bitmaps()) {
    if (!bitmap->persistent()) {
      continue;
    }
    const uint64_t bits = div_round_up(bitmap->size(), bitmap->granularity());
    const uint64_t clusters = div_round_up(div_round_up(bits, 8), cluster_size);
    total += clusters * cluster_size;
    total += round_up(clusters * 8, cluster_size);
    directory += block::qcow2::bitmap_directory_entry_size(bitmap->name().size());
  }
  return total + round_up(directory, cluster_size);
}

}  // namespace

int measure_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"object", required_argument, nullptr, kOptObject},
      {"output", required_argument, nullptr, kOptOutput},
      {"size", required_argument, nullptr, kOptSize},
      {"force-share", no_argument, nullptr, 'U'},
      {nullptr, 0, nullptr, 0},
  };
  ImageOpenRequest request;
  std::string output_format = "raw";
  std::string output = "human";
  std::vector<std::string> option_strings;
  std::optional<uint64_t> size;
  std::optional<SnapshotSelector> snapshot;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":hf:O:o:l:U", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: strata img measure [--output=human|json] [-O raw|qcow2] [-o OPTIONS] "
            "[--size N | [-f FMT] [-U] [--image-opts] FILENAME]\n");
        return 0;
      case 'f':
        request.format = optarg;
        break;
      case 'O':
        output_format = optarg;
        break;
      case 'o':
        option_strings.emplace_back(optarg);
        break;
      case 'U':
        request.force_share = true;
        break;
      case kOptImageOpts:
        image_opts = true;
        break;
      case kOptOutput:
        output = optarg;
        break;
      case kOptSize: {
        auto parsed = parse_size(optarg);
        if (!parsed || *parsed > static_cast<uint64_t>(INT64_MAX)) {
          report(std::string("Invalid image size specified: '") + optarg + "'.");
          return 1;
        }
        size = *parsed;
        break;
      }
      case 'l':
        snapshot = parse_snapshot_param(optarg);
        if (!snapshot) {
          return 1;
        }
        break;
      case kOptObject:
        if (add_object(optarg) != 0) {
          return 1;
        }
        break;
      case ':':
        return missing_argument(argv[optind - 1]);
      default:
        return unrecognized_option(argv[optind - 1]);
    }
  }
  if (output != "human" && output != "json") {
    return error_exit("--output expects 'human' or 'json' not '" + output + "'");
  }
  if (optind + 1 < argc) {
    return error_exit(std::string("Unexpected argument: ") + argv[optind + 1]);
  }
  const bool have_file = optind < argc;
  if (have_file && size) {
    report("--size N cannot be used together with a filename.");
    return 1;
  }
  if (!have_file && !size) {
    report("Either --size N or one filename must be specified.");
    return 1;
  }
  if (output_format != "raw" && output_format != "qcow2") {
    report("Unknown file format '" + output_format + "'");
    return 1;
  }
  auto items = split_options(option_strings);
  if (!items) {
    report(items.error().message());
    return 1;
  }
  std::map<std::string, std::string> given;
  for (const auto& [key, value] : *items) {
    const bool known = output_format == "qcow2" ? is_qcow2_create_option(key)
                                                : key == "size" || key == "preallocation";
    if (!known) {
      report("Invalid parameter '" + key + "'");
      report("Invalid options for file format '" + output_format + "'");
      return 1;
    }
    given[key] = value;
  }
  if (auto it = given.find("size"); it != given.end() && !size && !have_file) {
    auto parsed = parse_size(it->second);
    if (!parsed) {
      report("Parameter 'size' expects a non-negative number below 2^64");
      return 1;
    }
    size = *parsed;
  }
  MeasureTarget target;
  if (output_format == "qcow2" && !parse_qcow2_target(given, target)) {
    return 1;
  }
  if (output_format == "raw") {
    if (auto it = given.find("preallocation"); it != given.end()) {
      const std::string& mode = it->second;
      if (mode != "off" && mode != "falloc" && mode != "full") {
        report("invalid parameter value: " + mode);
        return 1;
      }
    }
  }

  std::optional<OpenedImage> image;
  if (have_file) {
    image = open_image_or_report(request, argv[optind], image_opts);
    if (!image) {
      return 1;
    }
    if (snapshot) {
      Result<void> loaded = load_snapshot(*image->session, *image->node, *snapshot);
      if (!loaded) {
        report("Failed to load snapshot: " + loaded.error().message());
        return 1;
      }
    }
  }
  const bool json = output == "json";
  if (output_format == "raw") {
    // QEMU's raw_measure: the whole virtual size either way.
    const uint64_t bytes = image ? image->node->length() : round_up(*size, 512);
    print_measure(json, bytes, bytes, std::nullopt);
    return 0;
  }
  const uint64_t cs = target.cluster_size;
  uint64_t virtual_size = round_up(size.value_or(0), cs);
  const uint64_t l2e_size = target.extended_l2 ? 16 : 8;
  if (div_round_up(virtual_size / cs, cs / l2e_size) * 8 > (uint64_t{32} << 20)) {
    report("The image size is too large (try using a larger cluster size)");
    return 1;
  }
  uint64_t required = 0;
  std::optional<uint64_t> bitmaps;
  if (image) {
    virtual_size = round_up(image->node->length(), cs);
    if (target.has_backing_file) {
      required = virtual_size;
    } else {
      Result<uint64_t> data = image->session->loop().block_on(required_data(*image->node, cs));
      if (!data) {
        report("Unable to get block status: " + errno_text(data.error()));
        return 1;
      }
      required = *data;
    }
    // Sources that can hold persistent bitmaps report the size theirs take in the target.
    if (target.version >= 3 && supports_persistent_bitmaps(*image->node)) {
      bitmaps = persistent_bitmaps_size(*image->node, cs);
    }
  }
  if (target.full_preallocation) {
    required = virtual_size;
  }
  const uint64_t fully_allocated =
      calc_prealloc_size(virtual_size, cs, target.refcount_order, target.extended_l2);
  print_measure(json, fully_allocated - virtual_size + required, fully_allocated, bitmaps);
  return 0;
}

}  // namespace strata::cli::img
