// `strata img bitmap`: qemu-img bitmap's options, order of checks, messages and exit codes. The
// operations run in command-line order on the image opened read-write, with the semantics of the
// QMP block-dirty-bitmap-* commands qemu-img calls; the format driver stores the persistent
// bitmaps when the image is closed.

#include <getopt.h>

#include <cerrno>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/bitmap/dirty_bitmap.h"
#include "block/bitmap/persistent_store.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

namespace {

enum {
  kOptObject = 256,
  kOptImageOpts,
  kOptAdd,
  kOptRemove,
  kOptClear,
  kOptEnable,
  kOptDisable,
  kOptMerge,
};

enum class Operation { kAdd, kRemove, kClear, kEnable, kDisable, kMerge };

struct Action {
  Operation operation;
  std::string source;  // --merge SOURCE
};

const char* operation_name(Operation operation) {
  switch (operation) {
    case Operation::kAdd:
      return "add";
    case Operation::kRemove:
      return "remove";
    case Operation::kClear:
      return "clear";
    case Operation::kEnable:
      return "enable";
    case Operation::kDisable:
      return "disable";
    case Operation::kMerge:
      return "merge";
  }
  return "";
}

Error bitmap_error(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

// QEMU's block_dirty_bitmap_lookup.
Result<block::bitmap::DirtyBitmap*> lookup(block::Node& node, const std::string& name) {
  block::bitmap::DirtyBitmap* bitmap = node.dirty_bitmaps().find(name);
  if (bitmap == nullptr) {
    return bitmap_error("Dirty bitmap '" + name + "' not found");
  }
  return bitmap;
}

// QEMU's bdrv_dirty_bitmap_check with the flags each command passes (no bitmap is ever busy
// here: nothing else runs).
struct Checks {
  bool readonly = false;
  bool inconsistent = false;
};
Result<void> check_usable(const block::bitmap::DirtyBitmap& bitmap, Checks checks) {
  if (checks.readonly && bitmap.readonly()) {
    return bitmap_error("Bitmap '" + bitmap.name() + "' is readonly and cannot be modified");
  }
  if (checks.inconsistent && bitmap.inconsistent()) {
    return bitmap_error("Bitmap '" + bitmap.name() +
                        "' is inconsistent and cannot be used\n"
                        "Try block-dirty-bitmap-remove to delete this bitmap from disk");
  }
  return ok();
}

// The default granularity of a new bitmap (QEMU's bdrv_get_default_bitmap_granularity).
uint32_t default_granularity(const block::Node& node) {
  const auto cluster = node.cluster_size();
  if (!cluster || *cluster == 0) {
    return 65536;
  }
  return static_cast<uint32_t>(std::min<uint64_t>(65536, std::max<uint64_t>(4096, *cluster)));
}

}  // namespace

Result<void> can_add_bitmap(block::Node& node, const std::string& name, uint32_t granularity) {
  if (granularity == 0) {
    granularity = default_granularity(node);
  }
  Result<void> valid = block::bitmap::check_new_bitmap(node.dirty_bitmaps(), name, granularity);
  if (!valid) {
    return valid;
  }
  auto* store = dynamic_cast<block::bitmap::PersistentBitmapStore*>(&node);
  if (store == nullptr) {
    return Error(ErrorKind::kUnsupported,
                 "Can't store persistent bitmaps to " + node.name() + ": Operation not supported",
                 ENOTSUP);
  }
  return store->can_store_new_bitmap(name, granularity);
}

Result<void> add_bitmap(block::Node& node, const std::string& name, uint32_t granularity,
                        bool disabled) {
  Result<void> possible = can_add_bitmap(node, name, granularity);
  if (!possible) {
    return possible;
  }
  if (granularity == 0) {
    granularity = default_granularity(node);
  }
  auto bitmap = std::make_unique<block::bitmap::DirtyBitmap>(name, node.length(), granularity);
  bitmap->set_persistent(true);
  bitmap->set_enabled(!disabled);
  node.dirty_bitmaps().add(std::move(bitmap));
  return ok();
}

Result<void> remove_bitmap(BlockSession& session, block::Node& node, const std::string& name) {
  auto bitmap = lookup(node, name);
  if (!bitmap) {
    return std::move(bitmap).error();
  }
  Result<void> usable = check_usable(**bitmap, {.readonly = true});
  if (!usable) {
    return usable;
  }
  if ((*bitmap)->persistent()) {
    auto* store = dynamic_cast<block::bitmap::PersistentBitmapStore*>(&node);
    if (store != nullptr) {
      Result<void> removed = session.loop().block_on(store->remove_persistent_bitmap(name));
      if (!removed) {
        return removed;
      }
    }
  }
  node.dirty_bitmaps().remove(name);
  return ok();
}

// QEMU's block_dirty_bitmap_merge with one source: the source is merged into a scratch bitmap
// of the target's granularity first, so the target is unchanged when anything fails.
Result<void> merge_bitmap(block::Node& node, const std::string& name, block::Node& source_node,
                          const std::string& source_name) {
  auto target = lookup(node, name);
  if (!target) {
    return std::move(target).error();
  }
  block::bitmap::DirtyBitmap* source = source_node.dirty_bitmaps().find(source_name);
  if (source == nullptr) {
    return bitmap_error("Dirty bitmap '" + source_name + "' not found");
  }
  block::bitmap::DirtyBitmap scratch("", node.length(), (*target)->granularity());
  Result<void> usable = check_usable(*source, {.inconsistent = true});
  if (!usable) {
    return usable;
  }
  if (source->size() != scratch.size()) {
    return bitmap_error("Bitmaps are incompatible and can't be merged");
  }
  scratch.merge_from(*source);
  usable = check_usable(**target, {.readonly = true, .inconsistent = true});
  if (!usable) {
    return usable;
  }
  (*target)->merge_from(scratch);
  return ok();
}

namespace {

Result<void> run_action(BlockSession& session, block::Node& node, block::Node& source_node,
                        const Action& action, const std::string& name, uint32_t granularity) {
  switch (action.operation) {
    case Operation::kAdd:
      return add_bitmap(node, name, granularity, false);
    case Operation::kRemove:
      return remove_bitmap(session, node, name);
    case Operation::kClear:
    case Operation::kEnable:
    case Operation::kDisable: {
      auto bitmap = lookup(node, name);
      if (!bitmap) {
        return std::move(bitmap).error();
      }
      const bool clear = action.operation == Operation::kClear;
      Result<void> usable = check_usable(**bitmap, {.readonly = clear, .inconsistent = true});
      if (!usable) {
        return usable;
      }
      if (clear) {
        (*bitmap)->clear();
      } else {
        (*bitmap)->set_enabled(action.operation == Operation::kEnable);
      }
      return ok();
    }
    case Operation::kMerge:
      return merge_bitmap(node, name, source_node, action.source);
  }
  return ok();
}

void print_help() {
  std::printf(
      "Usage:\n"
      "Perform modifications of the persistent bitmap in the image.  Usage:\n"
      "\n"
      "  strata img bitmap ( --merge SOURCE | --add | --remove | --clear |\n"
      "                --enable | --disable ).. [-f FMT | --image-opts]\n"
      "        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]\n"
      "        FILENAME BITMAP\n");
}

}  // namespace

int bitmap_main(int argc, char** argv) {
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"object", required_argument, nullptr, kOptObject},
      {"image-opts", no_argument, nullptr, kOptImageOpts},
      {"add", no_argument, nullptr, kOptAdd},
      {"remove", no_argument, nullptr, kOptRemove},
      {"clear", no_argument, nullptr, kOptClear},
      {"enable", no_argument, nullptr, kOptEnable},
      {"disable", no_argument, nullptr, kOptDisable},
      {"merge", required_argument, nullptr, kOptMerge},
      {"granularity", required_argument, nullptr, 'g'},
      {"source-file", required_argument, nullptr, 'b'},
      {"source-format", required_argument, nullptr, 'F'},
      {"format", required_argument, nullptr, 'f'},
      {nullptr, 0, nullptr, 0},
  };
  std::vector<Action> actions;
  std::optional<std::string> format;
  std::optional<std::string> source_file;
  std::optional<std::string> source_format;
  bool image_opts = false;
  bool add = false;
  bool merge = false;
  uint64_t granularity = 0;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, ":b:f:F:g:h", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        print_help();
        return 0;
      case 'b':
        source_file = optarg;
        break;
      case 'f':
        format = optarg;
        break;
      case 'F':
        source_format = optarg;
        break;
      case 'g': {
        // qemu-img's cvtnum("granularity", ...).
        const std::string text = optarg;
        auto value = parse_size(text);
        const bool negative = text.find_first_not_of(" \t") != std::string::npos &&
                              text[text.find_first_not_of(" \t")] == '-';
        if (!value && value.error().errno_value() != ERANGE && !negative) {
          report("Invalid granularity specified: '" + text + "'.");
          return 1;
        }
        if (!value || *value > static_cast<uint64_t>(INT64_MAX)) {
          report("Invalid granularity specified. Must be between 0 and 9223372036854775807.");
          return 1;
        }
        granularity = *value;
        break;
      }
      case kOptAdd:
        actions.push_back({Operation::kAdd, ""});
        add = true;
        break;
      case kOptRemove:
        actions.push_back({Operation::kRemove, ""});
        break;
      case kOptClear:
        actions.push_back({Operation::kClear, ""});
        break;
      case kOptEnable:
        actions.push_back({Operation::kEnable, ""});
        break;
      case kOptDisable:
        actions.push_back({Operation::kDisable, ""});
        break;
      case kOptMerge:
        actions.push_back({Operation::kMerge, optarg});
        merge = true;
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
  if (actions.empty()) {
    report("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    return 1;
  }
  if (granularity != 0 && !add) {
    report("granularity only supported with --add");
    return 1;
  }
  if (source_format && !source_file) {
    report("-F only supported with -b");
    return 1;
  }
  if (source_file && !merge) {
    report("Merge bitmap source file only supported with --merge");
    return 1;
  }
  if (optind != argc - 2) {
    report("Expecting filename and bitmap name");
    return 1;
  }
  if (image_opts && format) {
    report("--image-opts and --format are mutually exclusive");
    return 1;
  }
  const std::string filename = argv[optind];
  const std::string name = argv[optind + 1];

  ImageOpenRequest request;
  request.format = format;
  request.read_only = false;
  auto image = open_image_or_report(request, filename, image_opts);
  if (!image) {
    return 1;
  }
  block::Node& node = *image->node;
  block::Node* source_node = &node;
  if (source_file) {
    ImageOpenRequest source_request;
    source_request.filename = *source_file;
    source_request.format = source_format;
    auto opened = image->session->open(source_request);
    if (!opened) {
      report("Could not open '" + *source_file + "': " + opened.error().message());
      return 1;
    }
    source_node = *opened;
  }
  for (const auto& action : actions) {
    // QMP's granularity is a uint32 member: qemu-img passes the number truncated.
    Result<void> done = run_action(*image->session, node, *source_node, action, name,
                                   static_cast<uint32_t>(granularity));
    if (!done) {
      report(std::string("Operation ") + operation_name(action.operation) + " on bitmap " + name +
             " failed: " + done.error().message());
      return 1;
    }
  }
  return 0;
}

}  // namespace strata::cli::img
