#pragma once
// ImageInfo (QEMU's qapi BlockNodeInfo/ImageInfo) of one node: what query-named-block-nodes
// reports as "image" and what `strata img info` prints. Shared by the daemon and the tools.

#include <nlohmann/json.hpp>

#include "block/graph/node.h"

namespace strata::block {

// QEMU's bdrv_filter_or_cow_bs: the backing file of a format node, or the filtered child of a
// filter, or nullptr. Query output nests and counts this chain.
const Node* filter_or_cow(const Node& node);

// ImageInfo of one node (nested backing-image unless `flat`).
nlohmann::json image_info(const Node& node, bool flat);

}  // namespace strata::block
