#pragma once
// The driver table: how a BlockdevOptions becomes a Node. Each driver provides a decoder for its
// own members (no side effects) and an open function. Drivers register in driver_table.cc, the
// one list the build keeps.

#include <memory>
#include <span>
#include <string_view>

#include "base/result.h"
#include "block/drivers/blockdev_options.h"
#include "block/graph/graph.h"

namespace strata::block {

// What a driver's open function may use.
class OpenContext {
 public:
  OpenContext(Graph& graph, const CommonOptions& options) : graph_(graph), options_(options) {}
  Graph& graph() const { return graph_; }
  // The resolved common options of the node being opened.
  const CommonOptions& options() const { return options_; }
  // Opens an inline child (inheriting read-only/auto-read-only/cache from this node) or looks up
  // a referenced one, then attaches it to `parent` as `child_name` with `role`.
  Result<Child*> attach(Node& parent, const BlockdevRef& ref, std::string child_name,
                        uint32_t role) const;

 private:
  Graph& graph_;
  const CommonOptions& options_;
};

struct Driver {
  std::string_view name;
  // Decodes the driver's members from `d` (common members are consumed by the caller).
  std::unique_ptr<DriverOptions> (*parse)(ArgDecoder& d);
  Result<std::shared_ptr<Node>> (*open)(OpenContext& context, const BlockdevOptions& options);
};

std::span<const Driver> all_drivers();
const Driver* find_driver(std::string_view name);

// Opens a node (and its inline children) from decoded options and registers it. On failure
// nothing that was opened stays behind. `parent` gives inherited defaults for inline children.
Result<std::shared_ptr<Node>> open_blockdev(Graph& graph, const BlockdevOptions& options,
                                            const CommonOptions* parent = nullptr);

}  // namespace strata::block
