#pragma once
// Dynamic read-only for the base of a commit (QEMU's commit_start and commit_active_start:
// "convert base to r/w, if necessary"). A base opened read-only with auto-read-only becomes
// writable for the job, together with its storage children that are read-only only by
// inheritance, and read-only again when the job is done with it.

#include <memory>
#include <vector>

#include "block/graph/graph.h"

namespace strata::block::commit {

class WritableBase {
 public:
  WritableBase() = default;
  WritableBase(const WritableBase&) = delete;
  WritableBase& operator=(const WritableBase&) = delete;

  // Makes `base` writable when it is read-only (a no-op otherwise). The permission refresh that
  // reopens the files read-write may fail; taking the write permission afterwards reports it.
  void acquire(Graph& graph, Node& base);
  // Turns what acquire() made writable read-only again (idempotent).
  void restore(Graph& graph);
  // Leaves the nodes writable: the base has become the active layer (active commit).
  void keep() { nodes_.clear(); }

 private:
  std::vector<std::shared_ptr<Node>> nodes_;
};

}  // namespace strata::block::commit
