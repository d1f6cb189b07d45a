// `strata img convert --bitmaps [--skip-broken-bitmaps]`: qemu-img's convert_check_bitmaps and
// convert_copy_bitmaps. Every persistent bitmap of the source is added to the target with the
// same name, granularity and enabled state and filled by a merge; the target's driver stores them
// when the image is closed.
//
// Order: QEMU walks the source's bitmap list newest first (the reverse of the image's directory),
// so a failure names the last conflicting bitmap and the ones after it have been copied; its
// store then writes newly created bitmaps in the reverse of their creation, i.e. in the source's
// order. strata stores new bitmaps in creation order, so it checks in QEMU's order first and then
// creates the bitmaps QEMU would have created in the source's order: same messages, same result.

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "block/bitmap/dirty_bitmap.h"
#include "cli/img_internal.h"

namespace strata::cli::img {

bool check_bitmaps_copyable(block::Node& source, bool skip_broken) {
  if (!supports_persistent_bitmaps(source)) {
    report("Source lacks bitmap support");
    return false;
  }
  for (const auto& bitmap : source.dirty_bitmaps().bitmaps()) {
    if (!bitmap->persistent()) {
      continue;
    }
    if (!skip_broken && bitmap->inconsistent()) {
      report("Cannot copy inconsistent bitmap '" + bitmap->name() + "'");
      std::fprintf(stderr,
                   "Try --skip-broken-bitmaps, or use 'strata img bitmap --remove' to delete "
                   "it\n");
      return false;
    }
  }
  return true;
}

bool copy_bitmaps(BlockSession& session, block::Node& source, block::Node& target,
                  bool skip_broken) {
  // QEMU's order, up to the first failure.
  std::vector<const block::bitmap::DirtyBitmap*> copied;
  std::optional<std::string> failure;
  const auto& bitmaps = source.dirty_bitmaps().bitmaps();
  for (auto it = bitmaps.rbegin(); it != bitmaps.rend() && !failure; ++it) {
    const block::bitmap::DirtyBitmap& bitmap = **it;
    if (!bitmap.persistent()) {
      continue;
    }
    if (skip_broken && bitmap.inconsistent()) {
      report("warning: Skipping inconsistent bitmap '" + bitmap.name() + "'");
      continue;
    }
    Result<void> possible = can_add_bitmap(target, bitmap.name(), bitmap.granularity());
    if (!possible) {
      failure = "Failed to create bitmap " + bitmap.name() + ": " + possible.error().message();
    } else if (bitmap.size() != target.length()) {
      // QEMU created it, failed the merge and removed it again.
      failure = "Failed to populate bitmap " + bitmap.name() +
                ": Bitmaps are incompatible and can't be merged";
    } else {
      copied.push_back(&bitmap);
    }
  }
  for (auto it = copied.rbegin(); it != copied.rend(); ++it) {
    const std::string& name = (*it)->name();
    Result<void> added = add_bitmap(target, name, (*it)->granularity(), !(*it)->enabled());
    if (added) {
      added = merge_bitmap(target, name, source, name);
      if (!added) {
        (void)remove_bitmap(session, target, name);
      }
    }
    if (!added) {
      report("Failed to copy bitmap " + name + ": " + added.error().message());
      return false;
    }
  }
  if (failure) {
    report(*failure);
    return false;
  }
  return true;
}

}  // namespace strata::cli::img
