#include "daemon/export_bitmaps.h"

#include "block/graph/node.h"
#include "block/info/image_info.h"
#include "daemon/bitmap_commands.h"

namespace strata::daemon {

Result<std::vector<std::shared_ptr<block::bitmap::DirtyBitmap>>> resolve_export_bitmaps(
    block::Graph& graph, block::Node& exported,
    const std::vector<std::pair<std::optional<std::string>, std::string>>& requested,
    bool readonly_export) {
  std::vector<std::shared_ptr<block::bitmap::DirtyBitmap>> found;
  for (const auto& [node_name, name] : requested) {
    std::shared_ptr<block::bitmap::DirtyBitmap> bitmap;
    const block::Node* holder = nullptr;
    if (node_name) {
      Result<FoundBitmap> lookup = lookup_dirty_bitmap(graph, *node_name, name);
      if (!lookup) {
        return std::move(lookup).error();
      }
      bitmap = std::move(lookup->bitmap);
    } else {
      for (const block::Node* node = &exported; node != nullptr;
           node = block::filter_or_cow(*node)) {
        bitmap = node->dirty_bitmaps().find_shared(name);
        if (bitmap) {
          holder = node;
          break;
        }
      }
      if (!bitmap) {
        return make_error(ErrorKind::kNotFound, "Bitmap '" + name + "' is not found");
      }
    }
    // QEMU checks this for plain names only, on the node the name was found on, and before
    // the bitmap's own state.
    if (readonly_export && holder != nullptr && holder->is_writable() && bitmap->enabled()) {
      return make_error(ErrorKind::kInvalidArgument,
                        "Enabled bitmap '" + name + "' incompatible with readonly export");
    }
    Result<void> usable = block::bitmap::check_bitmap(*bitmap, block::bitmap::kCheckAllowReadonly);
    if (!usable) {
      return std::move(usable).error();
    }
    found.push_back(std::move(bitmap));
  }
  return found;
}

}  // namespace strata::daemon
