// Feeds arbitrary bytes to the NBD client as everything a server sends: the handshake, then the
// replies to four requests issued at once (cookies 1-4: a 4 KiB read at 0, a 4 KiB read at
// 64 KiB, a block status of 1 MiB at 0, a flush), all over an in-memory transport. Expected: the
// handshake fails cleanly, or every request completes (with success or an error) once the input
// ends, without a crash, a sanitizer report, a hang or an allocation driven by the input's
// length fields.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "aio/event_loop.h"
#include "aio/task_group.h"
#include "nbd/client_connection.h"
#include "nbd/client_handshake.h"
#include "nbd/protocol.h"
#include "nbd/transport.h"

namespace {

using namespace strata;

aio::Task<void> read_request(nbd::ClientConnection& connection, uint64_t offset,
                             std::string& buffer, int& finished) {
  auto done = co_await connection.read(offset, block::IoVector(buffer.data(), buffer.size()));
  (void)done;
  ++finished;
}

aio::Task<void> status_request(nbd::ClientConnection& connection, int& finished) {
  auto done = co_await connection.block_status(0, 1u << 20);
  (void)done;
  ++finished;
}

aio::Task<void> flush_request(nbd::ClientConnection& connection, int& finished) {
  auto done = co_await connection.command(nbd::kCmdFlush, 0, 0, 0);
  (void)done;
  ++finished;
}

// Issues the four requests inside the loop (waits need a running loop); the connection's reader
// starts with the first and serves all four.
aio::Task<void> session(nbd::ClientConnection& connection, std::string& first, std::string& second,
                        int& finished) {
  aio::TaskGroup group;
  group.spawn(read_request(connection, 0, first, finished));
  group.spawn(read_request(connection, 64 * 1024, second, finished));
  group.spawn(status_request(connection, finished));
  group.spawn(flush_request(connection, finished));
  co_await group.wait();
}

// One session over `input`: the handshake (asking for extended headers first or not), then the
// four requests.
void run_session(aio::EventLoop& loop, const std::string& input, bool extended_headers) {
  nbd::MemoryTransport transport(input);
  nbd::ClientHandshakeRequest request;
  request.extended_headers = extended_headers;
  auto info = loop.block_on(nbd::client_handshake(transport, request));
  if (!info) {
    return;
  }
  // The requests must fit the export as the node's request layer guarantees.
  if (info->size < (1u << 20)) {
    return;
  }
  nbd::ClientConnection connection(transport, *info);
  std::string first(4096, '\0');
  std::string second(4096, '\0');
  int finished = 0;
  loop.block_on(session(connection, first, second, finished));
  if (finished != 4) {
    __builtin_trap();  // a request was left waiting after the input ended
  }
}

}  // namespace

// The same input twice: as the server's side of a structured-reply session, and of one where
// the client asks for extended headers first (64-bit headers, extended reply chunks).
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<aio::EventLoop> loop = [] {
    auto created = aio::EventLoop::create(16);
    return created ? std::move(created).value() : nullptr;
  }();
  if (!loop) {
    return 0;
  }
  const std::string input(reinterpret_cast<const char*>(data), size);
  run_session(*loop, input, false);
  run_session(*loop, input, true);
  return 0;
}
