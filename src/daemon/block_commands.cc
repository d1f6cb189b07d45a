// QMP commands on the block graph: blockdev-add, blockdev-del, blockdev-reopen,
// blockdev-set-active, query-named-block-nodes, x-debug-query-block-graph.

#include <functional>

#include "base/arg_decoder.h"
#include "block/drivers/driver.h"
#include "block/io/request.h"
#include "daemon/daemon.h"
#include "daemon/node_info.h"

namespace strata::daemon {

namespace {

using Reply = aio::Task<Result<nlohmann::json>>;

Result<nlohmann::json> done(Result<void> result) {
  if (!result) {
    return std::move(result).error();
  }
  return nlohmann::json::object();
}

// Graph changes run with the affected nodes quiesced: new requests wait, and the section starts
// once the requests in flight have finished (QEMU's bdrv_drained_begin/end). The nodes are kept
// alive until the section ends, even if the change deletes them.
class DrainedSection {
 public:
  explicit DrainedSection(std::vector<block::Node*> nodes) {
    for (block::Node* node : nodes) {
      nodes_.push_back(node->shared_from_this());
      block::io::drain_begin(*node);
    }
  }
  ~DrainedSection() {
    for (auto& node : nodes_) {
      block::io::drain_end(*node);
    }
  }
  DrainedSection(const DrainedSection&) = delete;
  DrainedSection& operator=(const DrainedSection&) = delete;

  aio::Task<void> wait() {
    for (auto& node : nodes_) {
      co_await block::io::drain(*node);
    }
  }

 private:
  std::vector<std::shared_ptr<block::Node>> nodes_;
};

Error failed_to_find(const std::string& name) {
  return make_error(ErrorKind::kNotFound, "Failed to find node with node-name='" + name + "'");
}

}  // namespace

Result<void> Daemon::blockdev_add(const nlohmann::json& options, bool keyval) {
  ArgDecoder d(options, "", keyval);
  auto parsed = block::parse_blockdev_options(d, options);
  auto decoded = d.finish();
  if (!decoded) {
    return decoded;
  }
  if (!parsed->node_name) {
    return make_error(ErrorKind::kInvalidArgument,
                      "'node-name' must be specified for the root node");
  }
  auto node = block::open_blockdev(graph_, *parsed);
  if (!node) {
    return std::move(node).error();
  }
  graph_.add_monitor_ref(std::move(node).value());
  return ok();
}

namespace {

Result<void> blockdev_del(block::Graph& graph, const std::string& name) {
  block::Node* node = graph.find(name);
  if (node == nullptr) {
    return failed_to_find(name);
  }
  if (!graph.is_monitor_owned(*node)) {
    return make_error(ErrorKind::kInvalidArgument, "Node " + name + " is not owned by the monitor");
  }
  for (const block::Child* parent : node->parents()) {
    if (parent->parent_node() == nullptr) {
      return make_error(ErrorKind::kBusy, "Node " + name + " is in use");
    }
  }
  if (!node->parents().empty()) {
    return make_error(ErrorKind::kBusy, "Block device " + name + " is in use");
  }
  graph.remove_monitor_ref(*node);
  return ok();
}

// One entry of a blockdev-reopen: the node, its new options and what to restore on failure.
struct ReopenEntry {
  block::Node* node = nullptr;
  std::shared_ptr<block::BlockdevOptions> options;
  block::CommonOptions old_common;
  std::function<void()> apply_driver;
};

// blockdev-reopen is atomic over its list: every entry is checked, the new common options are
// installed, permissions are refreshed over all nodes at once, and on any failure everything is
// put back. Omitted options revert to their defaults.
Result<void> blockdev_reopen(block::Graph& graph, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::vector<nlohmann::json> list = d.list("options");
  std::vector<ReopenEntry> entries(list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    ArgDecoder element = d.element_decoder(list[i], i, "options");
    entries[i].options = block::parse_blockdev_options(element, list[i]);
    ignore_error(element.finish(), "recorded in the shared decoder state");
  }
  auto decoded = d.finish();
  if (!decoded) {
    return decoded;
  }
  if (entries.empty()) {
    return make_error(ErrorKind::kInvalidArgument, "Nothing to reopen");
  }
  for (auto& entry : entries) {
    const auto& options = *entry.options;
    if (!options.node_name) {
      return make_error(ErrorKind::kInvalidArgument, "node-name not specified");
    }
    entry.node = graph.find(*options.node_name);
    if (entry.node == nullptr) {
      return failed_to_find(*options.node_name);
    }
    if (options.driver != entry.node->driver_name()) {
      return make_error(ErrorKind::kInvalidArgument, "Cannot change the option 'driver'");
    }
    if (entry.node->created_inactive() ||
        (options.active.value_or(false) && !entry.node->is_active())) {
      return make_error(ErrorKind::kInvalidArgument,
                        "Option 'active' cannot be reset to its default value");
    }
    auto prepared = entry.node->prepare_reopen(*options.driver_options);
    if (!prepared) {
      return std::move(prepared).error();
    }
    entry.apply_driver = std::move(prepared).value();
  }
  std::vector<block::Node*> nodes;
  for (auto& entry : entries) {
    entry.old_common = entry.node->common_options();
    block::CommonOptions common = entry.options->resolve(nullptr);
    common.node_name = entry.old_common.node_name;
    common.active = entry.node->is_active();
    if (common.force_share && !common.read_only) {
      for (auto& undo : entries) {
        if (undo.node != nullptr && &undo != &entry) {
          undo.node->set_common_options(undo.old_common);
        }
      }
      return make_error(ErrorKind::kInvalidArgument,
                        "force-share=on can only be used with read-only images");
    }
    entry.node->set_common_options(common);
    nodes.push_back(entry.node);
  }
  auto refreshed = graph.refresh_perms(nodes);
  if (!refreshed) {
    for (auto& entry : entries) {
      entry.node->set_common_options(entry.old_common);
    }
    ignore_error(graph.refresh_perms(nodes), "restoring the permissions from before the reopen");
    return refreshed;
  }
  for (auto& entry : entries) {
    entry.apply_driver();
    entry.node->set_open_options(entry.options->json);
  }
  return ok();
}

Result<void> blockdev_set_active(block::Graph& graph, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::optional<std::string> name = d.opt_str("node-name");
  bool active = d.boolean("active");
  auto decoded = d.finish();
  if (!decoded) {
    return decoded;
  }
  block::Node* node = nullptr;
  if (name) {
    node = graph.find(*name);
    if (node == nullptr) {
      return failed_to_find(*name);
    }
  }
  auto result = graph.set_active(node, active);
  if (!result && node == nullptr && result.error().has_errno()) {
    return Error::from_errno(result.error().errno_value(), active
                                                               ? "Failed to activate all nodes"
                                                               : "Failed to inactivate all nodes");
  }
  return result;
}

}  // namespace

void Daemon::register_block_commands() {
  commands_.add("blockdev-add", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    co_return done(blockdev_add(args, false));
  });
  commands_.add("blockdev-del", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    ArgDecoder d(args);
    std::string name = d.str("node-name");
    auto decoded = d.finish();
    if (!decoded) {
      co_return std::move(decoded).error();
    }
    co_return done(blockdev_del(graph_, name));
  });
  commands_.add("blockdev-reopen", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    DrainedSection drained(graph_.nodes());
    co_await drained.wait();
    co_return done(blockdev_reopen(graph_, args));
  });
  commands_.add("blockdev-set-active", [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
    DrainedSection drained(graph_.nodes());
    co_await drained.wait();
    co_return done(blockdev_set_active(graph_, args));
  });
  commands_.add("query-named-block-nodes",
                [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
                  ArgDecoder d(args);
                  bool flat = d.opt_bool("flat").value_or(false);
                  auto decoded = d.finish();
                  if (!decoded) {
                    co_return std::move(decoded).error();
                  }
                  nlohmann::json list = nlohmann::json::array();
                  for (const block::Node* node : graph_.nodes()) {
                    list.push_back(block_device_info(*node, flat));
                  }
                  co_return list;
                });
  commands_.add("x-debug-query-block-graph",
                [this](const nlohmann::json& args, qmp::Monitor&) -> Reply {
                  ArgDecoder d(args);
                  auto decoded = d.finish();
                  if (!decoded) {
                    co_return std::move(decoded).error();
                  }
                  co_return debug_block_graph(graph_);
                });
}

}  // namespace strata::daemon
