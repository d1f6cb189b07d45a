#include "block/graph/graph.h"

#include <algorithm>
#include <cctype>
#include <set>

#include <fmt/format.h>

namespace strata::block {

// ---- Transaction ----------------------------------------------------------------------------

Transaction::~Transaction() {
  if (!finished_) {
    abort();
  }
}

void Transaction::add(std::function<void()> commit, std::function<void()> abort) {
  actions_.push_back(Action{std::move(commit), std::move(abort)});
}

void Transaction::commit() {
  finished_ = true;
  for (auto& action : actions_) {
    if (action.commit) {
      action.commit();
    }
  }
  actions_.clear();
}

void Transaction::abort() {
  finished_ = true;
  for (auto it = actions_.rbegin(); it != actions_.rend(); ++it) {
    if (it->abort) {
      it->abort();
    }
  }
  actions_.clear();
}

// ---- registry -------------------------------------------------------------------------------

Graph::~Graph() {
  // Drop monitor references newest first so parents go before the children they hold.
  while (!monitor_owned_.empty()) {
    monitor_owned_.pop_back();
  }
}

Result<void> Graph::check_node_name(std::string_view name) {
  bool valid = !name.empty() && std::isalpha(static_cast<unsigned char>(name[0]));
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_')) {
      valid = false;
    }
  }
  if (!valid) {
    return make_error(ErrorKind::kInvalidArgument,
                      "Invalid node-name: '" + std::string(name) + "'");
  }
  if (name.size() > 31) {
    return make_error(ErrorKind::kInvalidArgument, "Node name too long");
  }
  return ok();
}

bool Graph::name_in_use(std::string_view name) const {
  return by_name_.find(name) != by_name_.end();
}

Result<void> Graph::register_node(Node& node) {
  if (node.options_.node_name.empty()) {
    do {
      node.options_.node_name = fmt::format("#block{:03}", next_generated_name_++);
    } while (name_in_use(node.options_.node_name));
  } else if (name_in_use(node.name())) {
    return make_error(ErrorKind::kExists, "Duplicate nodes with node-name='" + node.name() + "'");
  }
  by_name_.emplace(node.name(), &node);
  creation_order_.push_back(&node);
  node.graph_ = this;
  return ok();
}

Node* Graph::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

std::vector<Node*> Graph::nodes() const {
  return std::vector<Node*>(creation_order_.rbegin(), creation_order_.rend());
}

void Graph::add_monitor_ref(std::shared_ptr<Node> node) {
  monitor_owned_.push_back(std::move(node));
}

bool Graph::is_monitor_owned(const Node& node) const {
  return std::any_of(monitor_owned_.begin(), monitor_owned_.end(),
                     [&](const auto& owned) { return owned.get() == &node; });
}

void Graph::remove_monitor_ref(Node& node) {
  auto it = std::find_if(monitor_owned_.begin(), monitor_owned_.end(),
                         [&](const auto& owned) { return owned.get() == &node; });
  if (it != monitor_owned_.end()) {
    std::shared_ptr<Node> last = std::move(*it);
    monitor_owned_.erase(it);
    last.reset();
  }
}

void Graph::node_destroyed(Node& node) {
  // A node that failed to open was never registered; its name may belong to another node.
  if (auto it = by_name_.find(node.name()); it != by_name_.end() && it->second == &node) {
    by_name_.erase(it);
  }
  creation_order_.erase(std::remove(creation_order_.begin(), creation_order_.end(), &node),
                        creation_order_.end());
  // Children lose a parent: their permissions can only shrink.
  while (!node.children_.empty()) {
    detach_child(node.children_.back().get());
  }
  node.graph_ = nullptr;
}

// ---- permissions ----------------------------------------------------------------------------

namespace {

bool reaches(const Node& from, const Node& target) {
  if (&from == &target) {
    return true;
  }
  for (const auto& c : from.children()) {
    if (reaches(*c->node(), target)) {
      return true;
    }
  }
  return false;
}

// Parents before children (QEMU's bdrv_topological_dfs).
void topological(Node* node, std::set<Node*>& seen, std::vector<Node*>& out) {
  if (!seen.insert(node).second) {
    return;
  }
  for (const auto& c : node->children()) {
    topological(c->node(), seen, out);
  }
  out.push_back(node);
}

}  // namespace

Result<void> Graph::check_parents_compliance(const Node& node) {
  // Every pair in both directions: `a` must share everything `b` takes (bdrv_a_allow_b). QEMU
  // keeps parents newest first and reports the first conflict in that order, so when two users
  // refuse each other the older one is named as requiring the permission.
  const auto& parents = node.parents();
  for (auto a_it = parents.rbegin(); a_it != parents.rend(); ++a_it) {
    const Child* a = *a_it;
    for (auto b_it = parents.rbegin(); b_it != parents.rend(); ++b_it) {
      const Child* b = *b_it;
      if (a == b || (b->perm() & a->shared()) == b->perm()) {
        continue;
      }
      return make_error(
          ErrorKind::kPermission,
          fmt::format("Permission conflict on node '{}': permissions '{}' are both required by "
                      "{} (uses node '{}' as '{}' child) and unshared by {} (uses node '{}' as "
                      "'{}' child).",
                      node.name(), perm_names(b->perm() & ~a->shared()),
                      b->parent()->parent_description(), node.name(), b->name(),
                      a->parent()->parent_description(), node.name(), a->name()));
    }
  }
  return ok();
}

Result<void> Graph::refresh_node_perm(Node& node, Transaction& tx) {
  uint64_t perm = node.cumulative_perm();
  uint64_t shared = node.cumulative_shared();
  if ((perm & (kPermWrite | kPermWriteUnchanged)) != 0 && !node.is_writable()) {
    return make_error(ErrorKind::kPermission, "Block node is read-only");
  }
  auto checked = node.check_perm(perm, shared);
  if (!checked) {
    return checked;
  }
  Node* n = &node;
  tx.add([n, perm, shared] { n->set_perm(perm, shared); }, [n] { n->abort_perm(); });
  for (const auto& c : node.children()) {
    uint64_t child_perm = 0;
    uint64_t child_shared = kPermAll;
    node.child_perm(*c, perm, shared, child_perm, child_shared);
    // A force-share node shares everything with everyone (QEMU's bdrv_child_perm).
    if (c->node()->common_options().force_share) {
      child_shared = kPermAll;
    }
    Child* edge = c.get();
    uint64_t old_perm = edge->perm_;
    uint64_t old_shared = edge->shared_;
    edge->perm_ = child_perm;
    edge->shared_ = child_shared;
    tx.add(nullptr, [edge, old_perm, old_shared] {
      edge->perm_ = old_perm;
      edge->shared_ = old_shared;
    });
  }
  return ok();
}

Result<void> Graph::refresh_perms_in(const std::vector<Node*>& nodes, Transaction& tx) {
  std::set<Node*> seen;
  std::vector<Node*> order;
  for (Node* node : nodes) {
    topological(node, seen, order);
  }
  std::reverse(order.begin(), order.end());
  for (Node* node : order) {
    auto compliant = check_parents_compliance(*node);
    if (!compliant) {
      return compliant;
    }
    auto refreshed = refresh_node_perm(*node, tx);
    if (!refreshed) {
      return refreshed;
    }
  }
  return ok();
}

Result<void> Graph::refresh_perms(const std::vector<Node*>& nodes) {
  Transaction tx;
  auto result = refresh_perms_in(nodes, tx);
  if (result) {
    tx.commit();
  } else {
    tx.abort();
  }
  return result;
}

// ---- edges ----------------------------------------------------------------------------------

Result<Child*> Graph::attach_child(Node& parent, std::shared_ptr<Node> child, std::string name,
                                   uint32_t role) {
  if (reaches(*child, parent)) {
    return make_error(ErrorKind::kInvalidArgument,
                      fmt::format("Making '{}' a {} child of '{}' would create a cycle",
                                  child->name(), name, parent.name()));
  }
  if (!child->is_active() && parent.is_active()) {
    return make_error(ErrorKind::kPermission,
                      fmt::format("Inactive '{}' can't be a {} child of active '{}'", child->name(),
                                  name, parent.name()));
  }
  Node* child_node = child.get();
  // The parent may not be registered yet (it is still opening); it must still detach its
  // children when it dies.
  parent.graph_ = this;
  auto edge = std::make_unique<Child>(&parent, &parent, std::move(child), std::move(name), role);
  Child* raw_edge = edge.get();
  uint64_t perm = 0;
  uint64_t shared = kPermAll;
  parent.child_perm(*raw_edge, parent.cumulative_perm(), parent.cumulative_shared(), perm, shared);
  if (child_node->common_options().force_share) {
    shared = kPermAll;
  }
  raw_edge->perm_ = perm;
  raw_edge->shared_ = shared;
  parent.children_.push_back(std::move(edge));
  child_node->parents_.push_back(raw_edge);

  Transaction tx;
  auto result = refresh_perms_in({&parent}, tx);
  if (!result) {
    tx.abort();
    // The edge may hold the only reference (an inline child): keep the child alive until its
    // permissions are refreshed.
    std::shared_ptr<Node> keep = raw_edge->node_ref();
    auto& parents = child_node->parents_;
    parents.erase(std::remove(parents.begin(), parents.end(), raw_edge), parents.end());
    parent.children_.pop_back();
    // Permissions of the would-be child return to what its other parents need.
    ignore_error(refresh_perms({child_node}), "shrinking permissions cannot fail");
    return result.error();
  }
  tx.commit();
  return raw_edge;
}

void Graph::detach_child(Child* child) {
  Node* parent = child->parent_node();
  std::shared_ptr<Node> node = child->node_ref();
  auto& parents = node->parents_;
  parents.erase(std::remove(parents.begin(), parents.end(), child), parents.end());
  auto& siblings = parent->children_;
  siblings.erase(std::remove_if(siblings.begin(), siblings.end(),
                                [&](const auto& c) { return c.get() == child; }),
                 siblings.end());
  ignore_error(refresh_perms({node.get()}), "dropping an edge only shrinks permissions");
  // `node` may be destroyed here if this edge held its last reference.
}

Result<void> Graph::replace_child(Child* child, std::shared_ptr<Node> new_node) {
  if (Node* parent = child->parent_node(); parent != nullptr && reaches(*new_node, *parent)) {
    return make_error(ErrorKind::kInvalidArgument,
                      fmt::format("Making '{}' a {} child of '{}' would create a cycle",
                                  new_node->name(), child->name(), parent->name()));
  }
  std::shared_ptr<Node> old_node = child->node_;
  auto unlink = [child](Node& n) {
    auto& ps = n.parents_;
    ps.erase(std::remove(ps.begin(), ps.end(), child), ps.end());
  };
  unlink(*old_node);
  child->node_ = new_node;
  new_node->parents_.push_back(child);
  std::vector<Node*> roots;
  if (child->parent_node() != nullptr) {
    roots.push_back(child->parent_node());
  }
  roots.push_back(new_node.get());
  roots.push_back(old_node.get());
  Transaction tx;
  auto result = refresh_perms_in(roots, tx);
  if (!result) {
    tx.abort();
    unlink(*new_node);
    child->node_ = old_node;
    old_node->parents_.push_back(child);
    return result;
  }
  tx.commit();
  return ok();
}

Result<void> Graph::replace_node(Node& from, const std::shared_ptr<Node>& to) {
  std::vector<Child*> moved;
  for (Child* edge : from.parents()) {
    if (edge->parent()->stays_at_node()) {
      continue;
    }
    if (Node* parent = edge->parent_node(); parent != nullptr && reaches(*to, *parent)) {
      continue;
    }
    moved.push_back(edge);
  }
  if (moved.empty()) {
    return ok();
  }
  std::shared_ptr<Node> keep = moved.front()->node_ref();
  auto move_edges = [&moved](Node& old_node, const std::shared_ptr<Node>& new_node) {
    auto& old_parents = old_node.parents_;
    for (Child* edge : moved) {
      old_parents.erase(std::remove(old_parents.begin(), old_parents.end(), edge),
                        old_parents.end());
      edge->node_ = new_node;
      new_node->parents_.push_back(edge);
    }
  };
  move_edges(from, to);
  std::vector<Node*> roots;
  for (Child* edge : moved) {
    if (edge->parent_node() != nullptr) {
      roots.push_back(edge->parent_node());
    }
  }
  roots.push_back(to.get());
  roots.push_back(&from);
  Transaction tx;
  auto result = refresh_perms_in(roots, tx);
  if (!result) {
    tx.abort();
    move_edges(*to, keep);
    return result;
  }
  tx.commit();
  return ok();
}

Result<void> Graph::insert_filter(const std::shared_ptr<Node>& filter,
                                  const std::shared_ptr<Node>& node) {
  if (auto registered = register_node(*filter); !registered) {
    return registered;
  }
  auto child = attach_child(*filter, node, "backing", kRoleFiltered | kRolePrimary);
  if (!child) {
    return std::move(child).error();
  }
  filter->limits_ = node->limits();
  return replace_node(*node, filter);
}

Result<std::unique_ptr<Child>> Graph::attach_root(BlockParent& user, std::shared_ptr<Node> node,
                                                  std::string name, uint32_t role, uint64_t perm,
                                                  uint64_t shared) {
  if (!node->is_active() && (perm & ~kPermConsistentRead) != 0) {
    return make_error(
        ErrorKind::kPermission,
        fmt::format("Permission '{}' unavailable on inactive node", perm_names(perm)));
  }
  Node* target = node.get();
  auto edge = std::make_unique<Child>(&user, nullptr, std::move(node), std::move(name), role);
  edge->perm_ = perm;
  edge->shared_ = shared;
  target->parents_.push_back(edge.get());
  auto result = refresh_perms({target});
  if (!result) {
    auto& ps = target->parents_;
    ps.erase(std::remove(ps.begin(), ps.end(), edge.get()), ps.end());
    ignore_error(refresh_perms({target}), "restoring the previous permissions");
    return result.error();
  }
  return edge;
}

void Graph::detach_root(std::unique_ptr<Child> child) {
  Node* node = child->node();
  auto& ps = node->parents_;
  ps.erase(std::remove(ps.begin(), ps.end(), child.get()), ps.end());
  std::shared_ptr<Node> keep = child->node_ref();
  child.reset();
  ignore_error(refresh_perms({keep.get()}), "dropping an edge only shrinks permissions");
}

Result<void> Graph::set_root_perm(Child& child, uint64_t perm, uint64_t shared) {
  uint64_t old_perm = child.perm_;
  uint64_t old_shared = child.shared_;
  child.perm_ = perm;
  child.shared_ = shared;
  auto result = refresh_perms({child.node()});
  if (!result) {
    child.perm_ = old_perm;
    child.shared_ = old_shared;
    ignore_error(refresh_perms({child.node()}), "restoring the previous permissions");
  }
  return result;
}

// ---- activation -----------------------------------------------------------------------------

namespace {
bool has_active_node_parent(const Node& node) {
  for (const Child* parent : node.parents()) {
    if (parent->parent_node() != nullptr && parent->parent_node()->is_active()) {
      return true;
    }
  }
  return false;
}
}  // namespace

Result<void> Graph::inactivate_recurse(Node& node, bool top_level) {
  if (!node.is_active()) {
    return ok();
  }
  if (has_active_node_parent(node)) {
    if (top_level) {
      return make_error(ErrorKind::kPermission, "Node has active parent node");
    }
    return ok();  // still used by an active parent: stays active
  }
  for (const Child* parent : node.parents()) {
    if (parent->parent_node() == nullptr &&
        (parent->perm() & (kPermWrite | kPermWriteUnchanged | kPermResize)) != 0) {
      return Error::from_errno(EPERM, "Failed to inactivate node");
    }
  }
  auto driver = node.on_inactivate();
  if (!driver) {
    return driver;
  }
  node.active_ = false;
  ignore_error(refresh_perms({&node}), "an inactive node only drops permissions");
  std::vector<std::shared_ptr<Node>> children;
  for (const auto& c : node.children()) {
    children.push_back(c->node_ref());
  }
  for (auto& child : children) {
    auto result = inactivate_recurse(*child, false);
    if (!result) {
      return result;
    }
  }
  return ok();
}

Result<void> Graph::activate_recurse(Node& node) {
  std::vector<std::shared_ptr<Node>> children;
  for (const auto& c : node.children()) {
    children.push_back(c->node_ref());
  }
  for (auto& child : children) {
    auto result = activate_recurse(*child);
    if (!result) {
      return result;
    }
  }
  if (node.is_active()) {
    return ok();
  }
  node.active_ = true;
  auto driver = node.on_activate();
  if (!driver) {
    node.active_ = false;
    return driver;
  }
  auto perms = refresh_perms({&node});
  if (!perms) {
    node.active_ = false;
    ignore_error(node.on_inactivate(), "rolling back a failed activation");
    ignore_error(refresh_perms({&node}), "restoring inactive permissions");
    return perms;
  }
  return ok();
}

Result<void> Graph::set_active(Node* node, bool active) {
  if (node != nullptr) {
    return active ? activate_recurse(*node) : inactivate_recurse(*node, true);
  }
  // Every node: top-level nodes (no node parents) first, children follow recursively.
  for (Node* n : nodes()) {
    bool top = std::none_of(n->parents().begin(), n->parents().end(),
                            [](const Child* c) { return c->parent_node() != nullptr; });
    if (!top) {
      continue;
    }
    auto result = active ? activate_recurse(*n) : inactivate_recurse(*n, true);
    if (!result) {
      return result;
    }
  }
  return ok();
}

}  // namespace strata::block
