#pragma once
// ImageInfo (QEMU's qapi BlockNodeInfo/ImageInfo) of one node: what query-named-block-nodes
// reports as "image" and what `strata img info` prints. Shared by the daemon and the tools.

#include <nlohmann/json.hpp>

#include "block/graph/node.h"

namespace strata::block {

// ImageInfo of one node (nested backing-image unless `flat`).
nlohmann::json image_info(const Node& node, bool flat);

}  // namespace strata::block
