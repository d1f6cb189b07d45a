#pragma once
// QMP views of the block graph: BlockDeviceInfo (query-named-block-nodes) and the debug graph
// (x-debug-query-block-graph), with QEMU's member names. ImageInfo is block/info/image_info.h.

#include <nlohmann/json.hpp>

#include "block/graph/graph.h"

namespace strata::daemon {

// BlockDeviceInfo of one node. With `flat`, the image's backing chain is not nested and
// backing_file_depth is 0.
nlohmann::json block_device_info(const block::Node& node, bool flat);
// BlockDirtyInfo list of the node's dirty bitmaps, newest first (empty when it has none: QEMU
// then leaves "dirty-bitmaps" out of BlockDeviceInfo).
nlohmann::json dirty_bitmap_info(const block::Node& node);
// XDbgBlockGraph: {"nodes": [...], "edges": [...]}.
nlohmann::json debug_block_graph(const block::Graph& graph);

}  // namespace strata::daemon
