#pragma once
// Dirty bitmaps over QMP (QEMU's block/monitor/bitmap-qmp-cmds.c and the bitmap actions of
// blockdev.c's transaction): block-dirty-bitmap-add, -remove, -clear, -enable, -disable, -merge
// as standalone commands and as `transaction` actions, and x-debug-block-dirty-bitmap-sha256.
// Errors carry QEMU's texts; every one is a GenericError.

#include <memory>
#include <string>

#include "base/result.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/graph/graph.h"

namespace strata::daemon {

class Daemon;

// QEMU's block_dirty_bitmap_lookup: the node named `node` (node-name) and its bitmap `name`,
// or "Node 'x' not found" / "Dirty bitmap 'y' not found".
struct FoundBitmap {
  block::Node* node = nullptr;
  std::shared_ptr<block::bitmap::DirtyBitmap> bitmap;
};
Result<FoundBitmap> lookup_dirty_bitmap(block::Graph& graph, const std::string& node,
                                        const std::string& name);

// Registers the commands above and the bitmap action types of `transaction`.
void register_bitmap_commands(Daemon& daemon);

}  // namespace strata::daemon
