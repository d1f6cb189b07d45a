#pragma once
// Graph: the registry of nodes and the only place edges change. Every attach, detach and
// permission change is a transaction over the affected subgraph: all nodes' permissions are
// recomputed parents-first, each driver may veto (lock conflicts, read-only files), and either
// everything commits or everything is rolled back (QEMU's bdrv_refresh_perms).
//
// Ownership: a node is kept alive by the monitor (blockdev-add) and by every edge pointing at it
// (std::shared_ptr). Root users (exports, jobs) own their root Child edges.

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "block/graph/node.h"

namespace strata::crypto {
class ObjectTable;
}  // namespace strata::crypto
namespace strata::block::throttle {
class ThrottleGroups;
}  // namespace strata::block::throttle

namespace strata::block {

// Undo/commit log of one graph change.
class Transaction {
 public:
  Transaction() = default;
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction();

  // `commit` runs on success (in order), `abort` on failure (in reverse order).
  void add(std::function<void()> commit, std::function<void()> abort);
  void commit();
  void abort();

 private:
  struct Action {
    std::function<void()> commit;
    std::function<void()> abort;
  };
  std::vector<Action> actions_;
  bool finished_ = false;
};

class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // ---- registry ---------------------------------------------------------------------------
  // Registers a freshly opened node. A node without a name gets a generated one ("#block123").
  // Fails with QEMU's "Duplicate nodes with node-name='x'" when taken.
  Result<void> register_node(Node& node);
  Node* find(std::string_view name) const;
  // Checks a user-supplied node name (letters, digits, '-', '.', '_'; starting with a letter;
  // at most 31 characters) with QEMU's message.
  static Result<void> check_node_name(std::string_view name);
  bool name_in_use(std::string_view name) const;
  // All nodes, newest first (QEMU lists named nodes in this order).
  std::vector<Node*> nodes() const;

  // Monitor ownership (blockdev-add / blockdev-del).
  void add_monitor_ref(std::shared_ptr<Node> node);
  bool is_monitor_owned(const Node& node) const;
  // Drops the monitor's reference; the node is destroyed when nothing else uses it.
  void remove_monitor_ref(Node& node);

  // ---- edges ------------------------------------------------------------------------------
  // Attaches `child` to `parent` under `name` with `role`, computing permissions from the
  // parent's cumulative ones; fails (changing nothing) on a cycle, an active parent of an
  // inactive child, or a permission conflict.
  Result<Child*> attach_child(Node& parent, std::shared_ptr<Node> child, std::string name,
                              uint32_t role);
  // Detaches `child` from its parent node; permissions only shrink, so this cannot fail.
  void detach_child(Child* child);
  // Replaces the node an existing edge points at (reopen with another file/backing).
  Result<void> replace_child(Child* child, std::shared_ptr<Node> new_node);
  // QEMU's bdrv_replace_node: every parent edge of `from` now points at `to`, except edges whose
  // parent stays at its node (jobs) and edges whose parent node `to` reaches (moving them would
  // make a cycle; this includes `to` itself when it is a filter above `from`). Permissions are
  // refreshed as one transaction; on failure nothing changes.
  Result<void> replace_node(Node& from, const std::shared_ptr<Node>& to);
  // Puts `filter`, a new filter node nobody uses yet, above `node` for a block job (QEMU's
  // bdrv_append of mirror_top/commit_top): registers it (a generated name when it has none),
  // attaches `node` as its "backing" child, gives it `node`'s limits and moves `node`'s users
  // onto it (replace_node). On failure the graph is as before once `filter` is dropped.
  Result<void> insert_filter(const std::shared_ptr<Node>& filter,
                             const std::shared_ptr<Node>& node);
  // Attaches a root user (export, job, device) with explicit permissions.
  Result<std::unique_ptr<Child>> attach_root(BlockParent& user, std::shared_ptr<Node> node,
                                             std::string name, uint32_t role, uint64_t perm,
                                             uint64_t shared);
  void detach_root(std::unique_ptr<Child> child);
  // Changes a root edge's permissions; on failure nothing changes.
  Result<void> set_root_perm(Child& child, uint64_t perm, uint64_t shared);

  // Recomputes permissions of `nodes` and everything below them, transactionally.
  Result<void> refresh_perms(const std::vector<Node*>& nodes);

  // ---- activation -------------------------------------------------------------------------
  // blockdev-set-active: `node` nullptr means every node. Inactivating an inactive node is a
  // no-op; activation recurses into children first.
  Result<void> set_active(Node* node, bool active);

  // Called by ~Node: unregisters and detaches the node's children.
  void node_destroyed(Node& node);

  // ---- events -----------------------------------------------------------------------------
  // QMP events raised by nodes (BLOCK_IMAGE_CORRUPTED): the daemon installs a sink that hands
  // them to its monitors; without one (strata img, strata io) they are dropped. emit_event may be
  // called from any node's home loop; the sink decides where the event is delivered.
  using EventSink = std::function<void(std::string name, nlohmann::json data)>;
  void set_event_sink(EventSink sink) { event_sink_ = std::move(sink); }
  void emit_event(std::string name, nlohmann::json data) const {
    if (event_sink_) {
      event_sink_(std::move(name), std::move(data));
    }
  }

  // ---- user-created objects ----------------------------------------------------------------
  // The TLS credentials and authz objects drivers name by id (the nbd driver's tls-creds): the
  // daemon's object table, or the one `--object` filled in a CLI tool; nullptr when there is
  // none. Looked up only while a node opens (what it resolves, it holds itself).
  // `other_object` tells whether some other user-created object (an iothread) has an id, for
  // QEMU's "is not TLS credentials" wording.
  void set_crypto_objects(const crypto::ObjectTable* objects,
                          std::function<bool(const std::string&)> other_object = {}) {
    crypto_objects_ = objects;
    other_object_ = std::move(other_object);
  }
  const crypto::ObjectTable* crypto_objects() const { return crypto_objects_; }
  bool has_other_object(const std::string& id) const { return other_object_ && other_object_(id); }
  // The throttle-group objects `throttle` nodes name (nullptr: none can be created).
  void set_throttle_groups(const throttle::ThrottleGroups* groups) { throttle_groups_ = groups; }
  const throttle::ThrottleGroups* throttle_groups() const { return throttle_groups_; }

 private:
  Result<void> refresh_perms_in(const std::vector<Node*>& nodes, Transaction& tx);
  Result<void> refresh_node_perm(Node& node, Transaction& tx);
  static Result<void> check_parents_compliance(const Node& node);
  Result<void> inactivate_recurse(Node& node, bool top_level);
  Result<void> activate_recurse(Node& node);

  std::map<std::string, Node*, std::less<>> by_name_;
  std::vector<Node*> creation_order_;
  std::vector<std::shared_ptr<Node>> monitor_owned_;
  uint64_t next_generated_name_ = 1;
  EventSink event_sink_;
  const crypto::ObjectTable* crypto_objects_ = nullptr;
  std::function<bool(const std::string&)> other_object_;
  const throttle::ThrottleGroups* throttle_groups_ = nullptr;
};

}  // namespace strata::block
