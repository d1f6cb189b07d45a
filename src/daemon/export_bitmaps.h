#pragma once
// The `bitmaps` of an NBD block-export-add (QEMU's nbd_export_create): which dirty bitmaps an
// export offers as qemu:dirty-bitmap:NAME contexts.

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"
#include "block/bitmap/dirty_bitmap.h"
#include "block/graph/graph.h"

namespace strata::daemon {

// Resolves each requested bitmap, in order, with QEMU's rules and texts:
// - a plain name is searched on `exported` and down its filter/COW chain ("Bitmap 'x' is not
//   found"); {node, name} names the node directly ("Node 'n' not found", "Dirty bitmap 'x' not
//   found");
// - a read-only export of a plain-named bitmap that is enabled on a writable node is refused
//   ("Enabled bitmap 'x' incompatible with readonly export");
// - the bitmap must be neither busy nor inconsistent (check_bitmap, kCheckAllowReadonly).
// Marks nothing busy: the caller does once the export is certain.
Result<std::vector<std::shared_ptr<block::bitmap::DirtyBitmap>>> resolve_export_bitmaps(
    block::Graph& graph, block::Node& exported,
    const std::vector<std::pair<std::optional<std::string>, std::string>>& requested,
    bool readonly_export);

}  // namespace strata::daemon
