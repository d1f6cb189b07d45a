#include "block/commit/writable_base.h"

namespace strata::block::commit {

namespace {

void set_read_only(Graph& graph, const std::vector<std::shared_ptr<Node>>& nodes, bool read_only) {
  std::vector<Node*> changed;
  for (const auto& node : nodes) {
    CommonOptions options = node->common_options();
    options.read_only = read_only;
    node->set_common_options(options);
    changed.push_back(node.get());
  }
  // Opening the files read-write may fail; the caller's write permission then reports it.
  (void)graph.refresh_perms(changed);
}

}  // namespace

void WritableBase::acquire(Graph& graph, Node& base) {
  if (!base.is_read_only() || !nodes_.empty()) {
    return;
  }
  nodes_.push_back(base.shared_from_this());
  for (const auto& child : base.children()) {
    Node& below = *child->node();
    if ((child->role() & kRoleCow) == 0 && below.is_read_only() &&
        below.common_options().auto_read_only) {
      nodes_.push_back(below.shared_from_this());
    }
  }
  set_read_only(graph, nodes_, false);
}

void WritableBase::restore(Graph& graph) {
  if (nodes_.empty()) {
    return;
  }
  std::vector<std::shared_ptr<Node>> nodes = std::move(nodes_);
  nodes_.clear();
  set_read_only(graph, nodes, true);
}

}  // namespace strata::block::commit
