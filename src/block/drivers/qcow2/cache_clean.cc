// cache-clean-interval (QEMU's cache_clean_timer_cb): memory held by metadata caches that a
// quiet image no longer needs is given back. Every interval, the clean L2 slices and refcount
// blocks that no request looked up since the previous round are dropped; dirty ones stay until
// they are written back.

#include <cerrno>

#include "aio/event_loop.h"
#include "block/drivers/qcow2/qcow2_node.h"

namespace strata::block::qcow2 {

void Qcow2Node::start_cache_cleaner(int64_t interval_seconds) {
  if (interval_seconds <= 0 || aio::EventLoop::current() == nullptr) {
    return;
  }
  cache_cleaner_.spawn(clean_caches_every(std::chrono::seconds(interval_seconds)));
}

aio::Task<void> Qcow2Node::clean_caches_every(std::chrono::seconds interval) {
  aio::EventLoop& loop = *aio::EventLoop::current();
  for (;;) {
    const int slept = co_await loop.sleep_for(interval);
    if (slept != -ETIME) {
      co_return;  // cancelled: the loop is stopping
    }
    auto meta = co_await meta_.scoped_lock();
    map_->l2_cache().drop_unused();
    if (refcounts_ != nullptr) {
      refcounts_->drop_unused();
    }
  }
}

}  // namespace strata::block::qcow2
