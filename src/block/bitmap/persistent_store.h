#pragma once
// The capability a format driver offers when it can keep dirty bitmaps in its image (QEMU's
// bdrv_co_can_store_new_dirty_bitmap / bdrv_co_remove_persistent_dirty_bitmap driver callbacks).
// Users find it with dynamic_cast on the node; nodes without it cannot hold persistent bitmaps.
// Storing happens in the driver itself when the node is closed or inactivated.

#include <string>

#include "aio/task.h"
#include "base/result.h"

namespace strata::block::bitmap {

class PersistentBitmapStore {
 public:
  virtual ~PersistentBitmapStore() = default;
  // Whether a new persistent bitmap `name` with `granularity` could be stored (the format's
  // version, size and count limits); the error carries QEMU's text without its "Can't make
  // bitmap ... persistent" prefix. The caller has checked the name is free.
  virtual Result<void> can_store_new_bitmap(const std::string& name, uint64_t granularity) = 0;
  // Removes bitmap `name` from the image now (absence is not an error). The in-memory bitmap is
  // the caller's to drop.
  virtual aio::Task<Result<void>> remove_persistent_bitmap(std::string name) = 0;
};

}  // namespace strata::block::bitmap
