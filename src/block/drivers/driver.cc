#include "block/drivers/driver.h"

namespace strata::block {

const Driver* find_driver(std::string_view name) {
  for (const auto& driver : all_drivers()) {
    if (driver.name == name) {
      return &driver;
    }
  }
  return nullptr;
}

Result<Child*> OpenContext::attach(Node& parent, const BlockdevRef& ref, std::string child_name,
                                   uint32_t role) const {
  std::shared_ptr<Node> child;
  if (ref.inline_options) {
    auto opened = open_blockdev(graph_, *ref.inline_options, &options_);
    if (!opened) {
      return std::move(opened).error();
    }
    child = std::move(opened).value();
  } else {
    Node* existing = graph_.find(ref.node_name);
    if (existing == nullptr) {
      return make_error(ErrorKind::kNotFound, "Cannot find device='" + ref.node_name +
                                                  "' nor node-name='" + ref.node_name + "'");
    }
    child = existing->shared_from_this();
  }
  return graph_.attach_child(parent, std::move(child), std::move(child_name), role);
}

Result<std::shared_ptr<Node>> open_blockdev(Graph& graph, const BlockdevOptions& options,
                                            const CommonOptions* parent) {
  const Driver* driver = find_driver(options.driver);
  if (driver == nullptr) {
    return make_error(ErrorKind::kInvalidArgument, "Unknown driver '" + options.driver + "'");
  }
  if (options.node_name) {
    auto valid = Graph::check_node_name(*options.node_name);
    if (!valid) {
      return std::move(valid).error();
    }
    if (graph.name_in_use(*options.node_name)) {
      return make_error(ErrorKind::kExists,
                        "Duplicate nodes with node-name='" + *options.node_name + "'");
    }
  }
  CommonOptions common = options.resolve(parent);
  if (common.detect_zeroes == "unmap" && common.discard != "unmap") {
    return make_error(ErrorKind::kInvalidArgument,
                      "setting detect-zeroes to unmap is not allowed without setting discard "
                      "operation to unmap");
  }
  if (common.force_share && !common.read_only) {
    return make_error(ErrorKind::kInvalidArgument,
                      "force-share=on can only be used with read-only images");
  }
  OpenContext context(graph, common);
  auto node = driver->open(context, options);
  if (!node) {
    return node;
  }
  (*node)->set_open_options(options.json);
  auto registered = graph.register_node(**node);
  if (!registered) {
    return std::move(registered).error();
  }
  // A node's own permissions start from what it needs of its children with no parents yet.
  auto perms = graph.refresh_perms({node->get()});
  if (!perms) {
    return std::move(perms).error();
  }
  return node;
}

}  // namespace strata::block
