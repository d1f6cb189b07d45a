#pragma once
// Where an NBD client connects (QEMU's SocketAddress, the unix and inet branches) and the
// connect itself, on an event loop.

#include <cstdint>
#include <string>

#include "aio/event_loop.h"
#include "aio/task.h"
#include "base/result.h"

namespace strata::nbd {

struct ServerAddress {
  enum class Type { kUnix, kInet };
  Type type = Type::kUnix;
  std::string path;  // kUnix
  std::string host;  // kInet
  std::string port;  // kInet, "10809" when not given

  // "'/path'" or "'host:port'" as QEMU's "Failed to connect to ..." message shows it.
  std::string description() const;
};

inline constexpr const char* kDefaultPort = "10809";

// Opens a stream socket to `address` on `loop`. Returns the connected descriptor (owned by the
// caller) or "Failed to connect to '...': <strerror>". Name resolution is synchronous.
aio::Task<Result<int>> connect_to_server(aio::EventLoop& loop, const ServerAddress& address);

}  // namespace strata::nbd
