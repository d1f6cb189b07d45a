// Option parsing and image helpers several `strata img` sub-commands share (img_internal.h):
// qemu-img's cvtnum, -l snapshot parameters and temporary snapshot loading, and the persistent
// bitmap capability test.

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>

#include "block/bitmap/persistent_store.h"
#include "block/drivers/qcow2/qcow2_node.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

int missing_argument(const char* option) {
  return error_exit(std::string("argument ") + option + " requires a value");
}

int unrecognized_option(const char* option) {
  return error_exit(std::string("Unknown option '") + option + "'");
}

int add_object(const char* spec) {
  auto added = add_tool_object(spec);
  if (!added) {
    report(added.error().message());
    return 1;
  }
  return 0;
}

std::optional<int64_t> parse_number(const char* text, const char* what, bool suffixes, int64_t min,
                                    int64_t max) {
  int64_t value = 0;
  bool parsed = false;
  bool in_range = true;
  if (suffixes) {
    if (text[0] == '-') {
      char* end = nullptr;
      errno = 0;
      const long long negative = std::strtoll(text, &end, 0);
      parsed = end != text && *end == '\0' && errno == 0;
      value = negative;
    } else {
      Result<uint64_t> size = parse_size(text);
      parsed = static_cast<bool>(size) || size.error().errno_value() == ERANGE;
      if (size) {
        in_range = *size <= static_cast<uint64_t>(INT64_MAX);
        value = in_range ? static_cast<int64_t>(*size) : 0;
      } else {
        in_range = false;
      }
    }
  } else {
    char* end = nullptr;
    errno = 0;
    const long long number = std::strtoll(text, &end, 0);
    parsed = end != text && *end == '\0';
    in_range = errno != ERANGE;
    value = number;
  }
  if (!parsed) {
    report(std::string("Invalid ") + what + " specified: '" + text + "'.");
    return std::nullopt;
  }
  if (!in_range || value < min || value > max) {
    report(std::string("Invalid ") + what + " specified. Must be between " + std::to_string(min) +
           " and " + std::to_string(max) + ".");
    return std::nullopt;
  }
  return value;
}

std::optional<SnapshotSelector> parse_snapshot_param(const std::string& text) {
  SnapshotSelector selector;
  if (text.rfind("snapshot.", 0) != 0) {
    selector.id_or_name = text;
    return selector;
  }
  // QemuOpts syntax over internal_snapshot_opts: "key=value" items, ",," a literal comma.
  auto items = split_options({text});
  std::optional<std::string> invalid;
  if (items) {
    for (const auto& [key, value] : *items) {
      if (key == "snapshot.id") {
        selector.id = value;
      } else if (key == "snapshot.name") {
        selector.name = value;
      } else {
        invalid = key;
        break;
      }
    }
  }
  if (!items || invalid) {
    report(items ? "Invalid parameter '" + *invalid + "'" : items.error().message());
    report("Failed in parsing snapshot param '" + text + "'");
    return std::nullopt;
  }
  return selector;
}

Result<void> load_snapshot(BlockSession& session, block::Node& node,
                           const SnapshotSelector& selector) {
  auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(&node);
  if (qcow2 == nullptr) {
    return Error(ErrorKind::kUnsupported,
                 std::string("Block format '") + node.format_name() +
                     "' used by device '' does not support temporarily loading internal "
                     "snapshots",
                 ENOTSUP);
  }
  if (!selector.id_or_name) {
    if (!selector.id && !selector.name) {
      return Error(ErrorKind::kInvalidArgument, "snapshot_id and name are both NULL", EINVAL);
    }
    return session.loop().block_on(qcow2->load_snapshot_read_only(selector.id, selector.name));
  }
  // bdrv_snapshot_load_tmp_by_id_or_name: as an ID first, then as a name.
  Result<void> by_id =
      session.loop().block_on(qcow2->load_snapshot_read_only(*selector.id_or_name, std::nullopt));
  if (by_id || (by_id.error().errno_value() != ENOENT && by_id.error().errno_value() != EINVAL)) {
    return by_id;
  }
  return session.loop().block_on(
      qcow2->load_snapshot_read_only(std::nullopt, *selector.id_or_name));
}

bool supports_persistent_bitmaps(block::Node& node) {
  if (dynamic_cast<block::bitmap::PersistentBitmapStore*>(&node) == nullptr) {
    return false;
  }
  auto* qcow2 = dynamic_cast<block::qcow2::Qcow2Node*>(&node);
  return qcow2 == nullptr || qcow2->header().version >= 3;
}

}  // namespace strata::cli::img
