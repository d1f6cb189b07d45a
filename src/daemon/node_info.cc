#include "daemon/node_info.h"

#include <map>

#include "block/bitmap/dirty_bitmap.h"
#include "block/info/image_info.h"

namespace strata::daemon {

using block::Node;

using block::filter_or_cow;
using block::image_info;

nlohmann::json dirty_bitmap_info(const Node& node) {
  nlohmann::json list = nlohmann::json::array();
  const auto& bitmaps = node.dirty_bitmaps().bitmaps();
  // QEMU lists a node's bitmaps newest first.
  for (auto it = bitmaps.rbegin(); it != bitmaps.rend(); ++it) {
    const block::bitmap::DirtyBitmap& bitmap = **it;
    nlohmann::json entry = {{"name", bitmap.name()},
                            {"count", bitmap.count()},
                            {"granularity", bitmap.granularity()},
                            {"recording", bitmap.enabled()},
                            {"busy", bitmap.busy()},
                            {"persistent", bitmap.persistent()}};
    if (bitmap.inconsistent()) {
      entry["inconsistent"] = true;
    }
    list.push_back(std::move(entry));
  }
  return list;
}

nlohmann::json block_device_info(const Node& node, bool flat) {
  const auto& options = node.common_options();
  nlohmann::json info;
  info["file"] = node.filename();
  info["node-name"] = node.name();
  info["ro"] = node.is_read_only();
  info["drv"] = node.driver_name();
  int depth = 0;
  // The attached backing node's filename (QEMU's bdrv_cow_bs), unlike ImageInfo's names.
  if (block::Child* backing = node.backing_child(); backing != nullptr) {
    info["backing_file"] = backing->node()->filename();
  }
  if (!flat) {
    for (const Node* n = filter_or_cow(node); n != nullptr; n = filter_or_cow(*n)) {
      ++depth;
    }
  }
  info["backing_file_depth"] = depth;
  info["active"] = node.is_active();
  info["encrypted"] = false;
  info["detect_zeroes"] = options.detect_zeroes;
  for (const char* key : {"bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"}) {
    info[key] = 0;
  }
  info["image"] = image_info(node, flat);
  info["cache"] = {
      {"writeback", true}, {"direct", options.cache_direct}, {"no-flush", options.cache_no_flush}};
  info["write_threshold"] = 0;
  if (nlohmann::json bitmaps = dirty_bitmap_info(node); !bitmaps.empty()) {
    info["dirty-bitmaps"] = std::move(bitmaps);
  }
  return info;
}

namespace {

nlohmann::json perm_list(uint64_t perms) {
  nlohmann::json list = nlohmann::json::array();
  static constexpr struct {
    uint64_t bit;
    const char* name;
  } kNames[] = {{block::kPermResize, "resize"},
                {block::kPermWriteUnchanged, "write-unchanged"},
                {block::kPermWrite, "write"},
                {block::kPermConsistentRead, "consistent-read"}};
  for (const auto& entry : kNames) {
    if ((perms & entry.bit) != 0) {
      list.push_back(entry.name);
    }
  }
  return list;
}

}  // namespace

nlohmann::json debug_block_graph(const block::Graph& graph) {
  nlohmann::json nodes = nlohmann::json::array();
  nlohmann::json edges = nlohmann::json::array();
  std::map<const void*, uint64_t> ids;
  uint64_t next_id = 1;
  auto id_of = [&](const void* p) {
    auto [it, inserted] = ids.emplace(p, next_id);
    if (inserted) {
      ++next_id;
    }
    return it->second;
  };
  for (const Node* node : graph.nodes()) {
    nodes.push_back({{"id", id_of(node)}, {"type", "block-driver"}, {"name", node->name()}});
  }
  for (const Node* node : graph.nodes()) {
    for (const block::Child* parent : node->parents()) {
      if (parent->parent_node() == nullptr) {
        const void* user = parent->parent();
        if (ids.find(user) == ids.end()) {
          nodes.push_back({{"id", id_of(user)}, {"type", "block-backend"}, {"name", ""}});
        }
      }
    }
    for (const auto& child : node->children()) {
      edges.push_back({{"parent", id_of(node)},
                       {"child", id_of(child->node())},
                       {"name", child->name()},
                       {"perm", perm_list(child->perm())},
                       {"shared-perm", perm_list(child->shared())}});
    }
  }
  for (const Node* node : graph.nodes()) {
    for (const block::Child* parent : node->parents()) {
      if (parent->parent_node() == nullptr) {
        edges.push_back({{"parent", id_of(parent->parent())},
                         {"child", id_of(node)},
                         {"name", parent->name()},
                         {"perm", perm_list(parent->perm())},
                         {"shared-perm", perm_list(parent->shared())}});
      }
    }
  }
  return {{"nodes", nodes}, {"edges", edges}};
}

}  // namespace strata::daemon
