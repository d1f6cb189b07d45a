#include "daemon/commit_command.h"

#include "base/arg_decoder.h"
#include "block/commit/commit_job.h"
#include "block/mirror/mirror_job.h"
#include "daemon/block_job_commands.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

// The node that has `top` as its backing file (the overlay whose link changes).
block::Node* overlay_of(const block::Node& top) {
  for (const block::Child* parent : top.parents()) {
    if (parent->parent_node() != nullptr && (parent->role() & block::kRoleCow) != 0) {
      return parent->parent_node();
    }
  }
  return nullptr;
}

Result<nlohmann::json> block_commit(Daemon& daemon, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::optional<std::string> job_id = d.opt_str("job-id");
  std::string device = d.str("device");
  std::optional<std::string> base_node = d.opt_str("base-node");
  std::optional<std::string> base = d.opt_str("base");
  std::optional<std::string> top_node = d.opt_str("top-node");
  std::optional<std::string> top = d.opt_str("top");
  std::optional<std::string> backing_file = d.opt_str("backing-file");
  bool backing_mask_protocol = d.opt_bool("backing-mask-protocol").value_or(false);
  std::optional<int64_t> speed = d.opt_i64("speed");
  std::string on_error = d.opt_enum("on-error", block::job::on_error_names()).value_or("report");
  std::optional<std::string> filter_node_name = d.opt_str("filter-node-name");
  bool auto_finalize = d.opt_bool("auto-finalize").value_or(true);
  bool auto_dismiss = d.opt_bool("auto-dismiss").value_or(true);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  block::Graph& graph = daemon.graph();
  block::Node* bs = graph.find(device);
  if (bs == nullptr) {
    return make_error(ErrorKind::kNotFound, "Device '" + device + "' not found");
  }
  if (!is_root_node(*bs)) {
    return generic("Need a root block node");
  }
  if (auto free = check_not_in_block_job(*bs); !free) {
    return std::move(free).error();
  }
  if (top_node && top) {
    return generic("'top-node' and 'top' are mutually exclusive");
  }
  block::Node* top_bs = bs;
  if (top_node) {
    top_bs = graph.find(*top_node);
    if (top_bs == nullptr) {
      return make_error(ErrorKind::kNotFound,
                        "Cannot find device='' nor node-name='" + *top_node + "'");
    }
    if (!block::chain_contains(*bs, *top_bs)) {
      return generic("'" + *top_node + "' is not in this backing file chain");
    }
  } else if (top) {
    top_bs = bs->filename() == *top ? bs : block::find_backing_image(*bs, *top);
    if (top_bs == nullptr) {
      return generic("Top image file " + *top + " not found");
    }
  }
  if (base_node && base) {
    return generic("'base-node' and 'base' are mutually exclusive");
  }
  block::Node* base_bs = nullptr;
  if (base_node) {
    base_bs = graph.find(*base_node);
    if (base_bs == nullptr) {
      return make_error(ErrorKind::kNotFound,
                        "Cannot find device='' nor node-name='" + *base_node + "'");
    }
    if (!block::chain_contains(*top_bs, *base_bs)) {
      return generic("'" + *base_node + "' is not in this backing file chain");
    }
  } else if (base) {
    base_bs = block::find_backing_image(*top_bs, *base);
    if (base_bs == nullptr) {
      return generic("Can't find '" + *base + "' in the backing chain");
    }
  } else {
    // QEMU's bdrv_find_base: the bottom of the chain.
    base_bs = top_bs;
    while (block::Node* next = block::filter_or_cow(*base_bs)) {
      base_bs = next;
    }
  }
  if (top_bs == base_bs) {
    return generic("cannot commit an image into itself");
  }
  uint64_t top_perm = 0;
  for (const block::Child* parent : top_bs->parents()) {
    top_perm |= parent->perm();
  }
  const bool active = top_bs == bs || (top_perm & block::kPermWrite) != 0;
  if (active) {
    if (backing_file) {
      return generic(top_bs == bs ? "'backing-file' specified, but 'top' is the active layer"
                                  : "'backing-file' specified, but 'top' has a writer on it");
    }
    // QEMU's commit_active_start: a mirror of the top into the base, completed by job-complete.
    block::mirror::MirrorOptions options;
    options.job_id = job_id.value_or(device);
    options.source = top_bs->shared_from_this();
    options.target = base_bs->shared_from_this();
    options.sync = block::mirror::SyncMode::kFull;
    options.on_source_error = *block::job::parse_on_error(on_error);
    options.on_target_error = options.on_source_error;
    options.filter_node_name = filter_node_name;
    options.is_commit = true;
    options.flags.auto_finalize = auto_finalize;
    options.flags.auto_dismiss = auto_dismiss;
    auto started =
        start_block_job(daemon, block::mirror::create_mirror_job(graph, std::move(options)), speed);
    if (!started) {
      return std::move(started).error();
    }
    return nlohmann::json::object();
  }
  block::Node* overlay = overlay_of(*top_bs);
  if (overlay == nullptr) {
    return generic("Cannot find the image that uses '" + top_bs->name() + "' as backing file");
  }

  block::commit::CommitOptions options;
  options.job_id = job_id.value_or("");
  options.top = top_bs->shared_from_this();
  options.base = base_bs->shared_from_this();
  options.overlay = overlay->shared_from_this();
  options.backing_file = backing_file;
  options.backing_mask_protocol = backing_mask_protocol;
  options.on_error = *block::job::parse_on_error(on_error);
  options.filter_node_name = filter_node_name;
  options.flags.auto_finalize = auto_finalize;
  options.flags.auto_dismiss = auto_dismiss;
  auto started =
      start_block_job(daemon, block::commit::create_commit_job(graph, std::move(options)), speed);
  if (!started) {
    return std::move(started).error();
  }
  return nlohmann::json::object();
}

}  // namespace

void register_commit_command(Daemon& daemon) {
  daemon.command_table().add(
      "block-commit",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        co_return block_commit(daemon, args);
      });
}

}  // namespace strata::daemon
