#pragma once
// Pieces shared by the ServerConnection translation units (server_connection.cc, the handshake
// in server_handshake.cc, transmission in server_transmission.cc). Not for other users.

#include <cerrno>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "nbd/buffer_pool.h"
#include "nbd/protocol.h"
#include "nbd/server_connection.h"

namespace strata::nbd::detail {

// Context ids as QEMU numbers them (NBD_META_ID_*); bitmaps follow allocation-depth.
constexpr uint32_t kContextBaseAllocation = 0;
constexpr uint32_t kContextAllocationDepth = 1;
constexpr uint32_t kContextFirstBitmap = 2;

// A name shown in an error message: at most 80 bytes and "..." (QEMU's nbd_sanitize_name), so
// every reply string stays far below the 4096-byte limit.
inline std::string sanitize_name(std::string_view name) {
  if (name.size() > 80) {
    return std::string(name.substr(0, 80)) + "...";
  }
  return std::string(name);
}

inline uint32_t error_of(const Error& error) {
  return wire_error(error.has_errno() ? error.errno_value() : EIO);
}

}  // namespace strata::nbd::detail

namespace strata::nbd {

struct ServerConnection::Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint64_t length = 0;      // the effect length (for BLOCK_STATUS with a payload, from the payload)
  BufferPool::Buffer data;  // WRITE payload, READ destination
  uint64_t buffered = 0;
  std::vector<uint32_t> contexts;  // BLOCK_STATUS: the context ids asked for
};

}  // namespace strata::nbd
