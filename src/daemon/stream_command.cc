#include "daemon/stream_command.h"

#include "base/arg_decoder.h"
#include "block/drivers/blockdev_options.h"
#include "block/drivers/driver.h"
#include "block/stream/stream_job.h"
#include "daemon/block_job_commands.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

// Opens a node from blockdev-add options that no monitor owns (a job's filter).
Result<std::shared_ptr<block::Node>> open_internal_node(block::Graph& graph,
                                                        const nlohmann::json& options) {
  ArgDecoder d(options);
  auto parsed = block::parse_blockdev_options(d, options);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  return block::open_blockdev(graph, *parsed);
}

Result<nlohmann::json> block_stream(Daemon& daemon, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::optional<std::string> job_id = d.opt_str("job-id");
  std::string device = d.str("device");
  std::optional<std::string> base = d.opt_str("base");
  std::optional<std::string> base_node = d.opt_str("base-node");
  std::optional<std::string> backing_file = d.opt_str("backing-file");
  bool backing_mask_protocol = d.opt_bool("backing-mask-protocol").value_or(false);
  std::optional<std::string> bottom = d.opt_str("bottom");
  std::optional<int64_t> speed = d.opt_i64("speed");
  std::string on_error = d.opt_enum("on-error", block::job::on_error_names()).value_or("report");
  std::optional<std::string> filter_node_name = d.opt_str("filter-node-name");
  bool auto_finalize = d.opt_bool("auto-finalize").value_or(true);
  bool auto_dismiss = d.opt_bool("auto-dismiss").value_or(true);
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  if (base && base_node) {
    return generic("'base' and 'base-node' cannot be specified at the same time");
  }
  if (base && bottom) {
    return generic("'base' and 'bottom' cannot be specified at the same time");
  }
  if (bottom && base_node) {
    return generic("'bottom' and 'base-node' cannot be specified at the same time");
  }
  block::Graph& graph = daemon.graph();
  block::Node* top = graph.find(device);
  if (top == nullptr) {
    return make_error(ErrorKind::kNotFound,
                      "Cannot find device='" + device + "' nor node-name='" + device + "'");
  }
  block::Node* base_bs = nullptr;
  if (base) {
    base_bs = block::find_backing_image(*top, *base);
    if (base_bs == nullptr) {
      return generic("Can't find '" + *base + "' in the backing chain");
    }
  }
  if (base_node) {
    base_bs = graph.find(*base_node);
    if (base_bs == nullptr) {
      return make_error(ErrorKind::kNotFound,
                        "Cannot find device='' nor node-name='" + *base_node + "'");
    }
    if (base_bs == top || !block::chain_contains(*top, *base_bs)) {
      return generic("Node '" + *base_node + "' is not a backing image of '" + device + "'");
    }
  }
  if (bottom) {
    block::Node* bottom_bs = graph.find(*bottom);
    if (bottom_bs == nullptr) {
      return make_error(ErrorKind::kNotFound,
                        "Cannot find device='' nor node-name='" + *bottom + "'");
    }
    if (bottom_bs->is_filter()) {
      return generic("Bottom node '" + *bottom + "' is a filter");
    }
    if (bottom_bs == top || !block::chain_contains(*top, *bottom_bs)) {
      return generic("Node '" + *bottom + "' is not in a chain starting from '" + device + "'");
    }
    base_bs = block::filter_or_cow(*bottom_bs);
  }
  if (base_bs == nullptr && backing_file) {
    return generic("backing file specified, but streaming the entire chain");
  }
  if (auto free = check_not_in_block_job(*top); !free) {
    return std::move(free).error();
  }
  // QEMU's stream_start: a copy-on-read filter above the top for the job's duration, copying
  // only what lies above the base.
  block::Node* above_base = nullptr;
  for (block::Node* n = top; n != nullptr && base_bs != nullptr; n = block::filter_or_cow(*n)) {
    if (block::filter_or_cow(*n) == base_bs) {
      above_base = n;
      break;
    }
  }
  nlohmann::json filter_options = {{"driver", "copy-on-read"}, {"file", top->name()}};
  if (above_base != nullptr) {
    filter_options["bottom"] = above_base->name();
  }
  if (filter_node_name) {
    filter_options["node-name"] = *filter_node_name;
  }
  auto filter = open_internal_node(graph, filter_options);
  if (!filter) {
    return std::move(filter).error();
  }

  block::stream::StreamOptions options;
  options.job_id = job_id.value_or("");
  options.top = top->shared_from_this();
  options.above_base = above_base != nullptr ? above_base->shared_from_this() : nullptr;
  options.backing_file = backing_file;
  options.backing_mask_protocol = backing_mask_protocol;
  options.on_error = *block::job::parse_on_error(on_error);
  options.flags.auto_finalize = auto_finalize;
  options.flags.auto_dismiss = auto_dismiss;
  options.filter = std::move(filter).value();
  auto started =
      start_block_job(daemon, block::stream::create_stream_job(graph, std::move(options)), speed);
  if (!started) {
    return std::move(started).error();
  }
  return nlohmann::json::object();
}

}  // namespace

void register_stream_command(Daemon& daemon) {
  daemon.command_table().add(
      "block-stream",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        co_return block_stream(daemon, args);
      });
}

}  // namespace strata::daemon
