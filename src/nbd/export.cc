#include "nbd/export.h"

#include <algorithm>

#include "nbd/protocol.h"

namespace strata::nbd {

Export::Export(std::string id, ExportConfig config, std::shared_ptr<block::Node> node)
    : id_(std::move(id)), config_(std::move(config)), node_(std::move(node)) {
  idle_.set();
}

Export::~Export() {
  release_bitmaps();
}

void Export::release_bitmaps() {
  if (bitmaps_released_) {
    return;
  }
  bitmaps_released_ = true;
  for (const auto& bitmap : config_.bitmap_sources) {
    bitmap->set_busy(false);
  }
}

uint16_t Export::flags() const {
  // QEMU's nbd_export_create: flush, FUA and cache always; write commands when writable.
  uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendCache;
  if (config_.writable) {
    flags |= kFlagSendTrim | kFlagSendWriteZeroes | kFlagSendFastZero;
  } else {
    flags |= kFlagReadOnly;
  }
  if (config_.multi_conn) {
    flags |= kFlagCanMultiConn;
  }
  return flags;
}

void Export::add_connection(Closable& connection) {
  connections_.push_back(&connection);
  idle_.reset();
}

void Export::remove_connection(Closable& connection) {
  connections_.erase(std::remove(connections_.begin(), connections_.end(), &connection),
                     connections_.end());
  if (connections_.empty()) {
    idle_.set();
  }
}

void Export::request_shutdown() {
  shutting_down_ = true;
  // close() may unregister synchronously; iterate over a copy.
  std::vector<Closable*> connections = connections_;
  for (Closable* connection : connections) {
    connection->close();
  }
}

aio::Task<void> Export::wait_idle() {
  while (!connections_.empty()) {
    co_await idle_.wait();
  }
}

}  // namespace strata::nbd
