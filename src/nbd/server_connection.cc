#include "nbd/server_connection.h"

#include <algorithm>
#include <cstring>

#include "block/io/request.h"
#include "nbd/allocation.h"
#include "nbd/protocol.h"
#include "nbd/server_connection_internal.h"

namespace strata::nbd {

using namespace detail;

size_t ServerConnection::MetaContexts::count() const {
  size_t n = (base_allocation ? 1 : 0) + (allocation_depth ? 1 : 0);
  for (bool b : bitmaps) {
    n += b ? 1 : 0;
  }
  return n;
}

ServerConnection::ServerConnection(Transport& transport, const ExportDirectory& exports)
    : base_transport_(transport), channel_(transport), transport_(channel_), exports_(exports) {}

ServerConnection::~ServerConnection() {
  if (registered_) {
    export_->remove_connection(*this);
  }
}

void ServerConnection::close() {
  closing_ = true;
  transport_.shutdown();
  slot_free_.set();
}

aio::Task<void> ServerConnection::run() {
  bool selected = co_await negotiate();
  if (!selected || closing_) {
    co_return;
  }
  co_await transmission();
  // Requests still running hold references into this object; the transport stays open until
  // they have sent (or failed to send) their replies.
  co_await requests_.wait();
  if (registered_) {
    registered_ = false;
    export_->remove_connection(*this);
  }
}

std::shared_ptr<Export> ServerConnection::find_export(std::string_view name) const {
  auto exp = exports_.find_export(name);
  if (exp && exp->shutting_down()) {
    return nullptr;
  }
  return exp;
}

}  // namespace strata::nbd
