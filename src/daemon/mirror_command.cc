#include "daemon/mirror_command.h"

#include <array>

#include "base/arg_decoder.h"
#include "block/mirror/mirror_job.h"
#include "daemon/block_job_commands.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

using block::mirror::CopyMode;
using block::mirror::SyncMode;

constexpr std::array<std::string_view, 5> kSyncModes = {"top", "full", "none", "incremental",
                                                        "bitmap"};
constexpr std::array<std::string_view, 2> kCopyModes = {"background", "write-blocking"};

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

Error not_found(const std::string& name) {
  return make_error(ErrorKind::kNotFound,
                    "Cannot find device='" + name + "' nor node-name='" + name + "'");
}

// QEMU's bdrv_recurse_can_replace: `to_replace` is `source` or a node it filters.
bool can_replace(const block::Node& source, const block::Node& to_replace) {
  for (const block::Node* n = &source; n != nullptr;) {
    if (n == &to_replace) {
      return true;
    }
    const block::Child* filtered = n->is_filter() ? n->primary_child() : nullptr;
    n = filtered != nullptr ? filtered->node() : nullptr;
  }
  return false;
}

Result<nlohmann::json> blockdev_mirror(Daemon& daemon, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::optional<std::string> job_id = d.opt_str("job-id");
  std::string device = d.str("device");
  std::string target = d.str("target");
  std::optional<std::string> replaces = d.opt_str("replaces");
  std::string sync = d.enumeration("sync", kSyncModes);
  std::optional<int64_t> speed = d.opt_i64("speed");
  std::optional<int64_t> granularity = d.opt_i64("granularity");
  std::optional<int64_t> buf_size = d.opt_i64("buf-size");
  std::string on_source_error =
      d.opt_enum("on-source-error", block::job::on_error_names()).value_or("report");
  std::string on_target_error =
      d.opt_enum("on-target-error", block::job::on_error_names()).value_or("report");
  std::optional<std::string> filter_node_name = d.opt_str("filter-node-name");
  std::string copy_mode = d.opt_enum("copy-mode", kCopyModes).value_or("background");
  bool auto_finalize = d.opt_bool("auto-finalize").value_or(true);
  bool auto_dismiss = d.opt_bool("auto-dismiss").value_or(true);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  block::Graph& graph = daemon.graph();
  block::Node* source = graph.find(device);
  if (source == nullptr) {
    return not_found(device);
  }
  if (!is_root_node(*source)) {
    return generic("Need a root block node");
  }
  block::Node* target_bs = graph.find(target);
  if (target_bs == nullptr) {
    return not_found(target);
  }
  if (auto free = check_not_in_block_job(*target_bs); !free) {
    return std::move(free).error();
  }
  if (granularity && *granularity != 0 &&
      (*granularity < 512 || *granularity > (int64_t{64} << 20))) {
    return generic("Parameter 'granularity' expects a value in range [512B, 64MB]");
  }
  if (granularity && (*granularity & (*granularity - 1)) != 0) {
    return generic("Parameter 'granularity' expects a power of 2");
  }
  SyncMode mode = SyncMode::kFull;
  if (sync == "top") {
    // QEMU: without a backing file, top is full.
    mode = block::filter_or_cow(*source) != nullptr ? SyncMode::kTop : SyncMode::kFull;
  } else if (sync == "none") {
    mode = SyncMode::kNone;
  }
  block::Node* to_replace = nullptr;
  if (replaces) {
    to_replace = graph.find(*replaces);
    if (to_replace == nullptr) {
      return generic("Failed to find node with node-name='" + *replaces + "'");
    }
    if (!can_replace(*source, *to_replace)) {
      return generic("Cannot replace '" + *replaces + "' by a node mirrored from '" + device +
                     "', because it cannot be guaranteed that doing so would not lead to an "
                     "abrupt change of visible data");
    }
    if (to_replace->length() != source->length()) {
      return generic("cannot replace image with a mirror image of different size");
    }
  }
  if (sync == "incremental" || sync == "bitmap") {
    return generic("Sync mode '" + sync + "' not supported");
  }
  if (source == target_bs) {
    return generic("Can't mirror node into itself");
  }
  if (buf_size && *buf_size < 0) {
    return generic("Invalid parameter 'buf-size'");
  }

  block::mirror::MirrorOptions options;
  options.job_id = job_id.value_or(device);
  options.source = source->shared_from_this();
  options.target = target_bs->shared_from_this();
  if (to_replace != nullptr) {
    options.replaces = to_replace->shared_from_this();
  }
  options.sync = mode;
  options.granularity = static_cast<uint64_t>(granularity.value_or(0));
  options.buf_size = static_cast<uint64_t>(buf_size.value_or(0));
  options.on_source_error = *block::job::parse_on_error(on_source_error);
  options.on_target_error = *block::job::parse_on_error(on_target_error);
  options.filter_node_name = filter_node_name;
  options.copy_mode =
      copy_mode == "write-blocking" ? CopyMode::kWriteBlocking : CopyMode::kBackground;
  options.flags.auto_finalize = auto_finalize;
  options.flags.auto_dismiss = auto_dismiss;
  auto started =
      start_block_job(daemon, block::mirror::create_mirror_job(graph, std::move(options)), speed);
  if (!started) {
    return std::move(started).error();
  }
  return nlohmann::json::object();
}

}  // namespace

void register_mirror_command(Daemon& daemon) {
  daemon.command_table().add(
      "blockdev-mirror",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        co_return blockdev_mirror(daemon, args);
      });
}

}  // namespace strata::daemon
