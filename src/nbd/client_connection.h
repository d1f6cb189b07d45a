#pragma once
// ClientConnection: the transmission phase of one NBD client connection (QEMU's block/nbd.c
// request path and nbd/client.c reply parsing). Many requests are in flight on one transport; one
// reader coroutine reads every reply and hands it to the request waiting for its cookie. Replies
// may arrive in any order. The reader runs only while requests wait for replies (the first
// request starts it on its loop, it ends when none is left), so an idle connection keeps no
// coroutine suspended on any loop and may be moved to another loop with rebind().
//
// Replies are validated strictly (doc/proto.md "Structured reply chunk message types"): a cookie
// nobody waits for, a chunk outside its request, a chunk type the request cannot get, a length
// over the limits below, or an error chunk with error 0 is a protocol error. A protocol error or a
// lost transport breaks the connection: every request in flight and every later request fails
// with EIO and a message that says what the server did. Nothing the server sends can make the
// client allocate more than its request's own buffer plus kMaxChunkOverhead, or wait forever
// once the transport is shut down.
//
// Threading: all calls and the reader run on one event loop (the loop of the node's requests).

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

#include "aio/sync.h"
#include "aio/task.h"
#include "aio/task_group.h"
#include "base/result.h"
#include "block/io/io_vector.h"
#include "nbd/client_handshake.h"
#include "nbd/transport.h"

namespace strata::nbd {

// One extent of a BLOCK_STATUS reply for the selected context.
struct BlockStatusExtent {
  uint64_t length = 0;
  uint32_t flags = 0;  // kStateHole / kStateZero for base:allocation
};

class ClientConnection {
 public:
  // Requests in flight at once; later ones wait for a slot (QEMU's MAX_NBD_REQUESTS).
  static constexpr size_t kMaxInFlight = 16;
  // Largest non-data chunk payload accepted (an error chunk carries at most a 4096-byte message).
  static constexpr uint32_t kMaxChunkOverhead = 64 * 1024;

  ClientConnection(Transport& transport, const ExportInfo& info);
  ~ClientConnection();
  ClientConnection(const ClientConnection&) = delete;
  ClientConnection& operator=(const ClientConnection&) = delete;

  // Moves an idle connection (idle() true) to `transport`: the same byte stream, served by
  // another loop. The old transport must not be used again.
  void rebind(Transport& transport);
  // No request is registered and the reader is not running.
  bool idle() const { return pending_.empty() && !reader_running_; }

  // Each request: offset and length within the export, length at most kMaxBufferSize (callers
  // split). Fail with EIO once the connection is broken.
  aio::Task<Result<void>> read(uint64_t offset, block::IoVector qiov);
  aio::Task<Result<void>> write(uint64_t offset, block::IoVector data, uint16_t flags);
  // FLUSH, TRIM, WRITE_ZEROES and CACHE: no payload either way.
  aio::Task<Result<void>> command(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length);
  // BLOCK_STATUS with NBD_CMD_FLAG_REQ_ONE for the selected context: the first extent, clamped
  // to `length`.
  aio::Task<Result<BlockStatusExtent>> block_status(uint64_t offset, uint32_t length);

  // Sends NBD_CMD_DISC (best effort) and shuts the transport down; pending requests fail.
  aio::Task<void> disconnect();
  // Shuts the transport down; pending requests fail with EIO.
  void shutdown();

  // The connection can carry no more requests (peer gone, protocol error, or shut down).
  bool broken() const { return broken_; }
  // Why it broke (empty while healthy).
  const std::string& failure() const { return failure_; }
  const ExportInfo& info() const { return info_; }

 private:
  struct Pending;
  class PendingGuard;

  // Reads replies while requests wait for them, until the connection breaks.
  aio::Task<void> run_reader();
  aio::Task<Result<void>> run_request(Pending& pending, const block::IoVector* payload);
  aio::Task<Result<void>> submit(Pending& pending, const block::IoVector* payload);
  aio::Task<Result<void>> read_reply();
  aio::Task<Result<void>> read_simple_reply();
  aio::Task<Result<void>> read_structured_chunk();
  // An extended reply chunk (after its magic): the same chunks with a 64-bit length, and
  // NBD_REPLY_TYPE_BLOCK_STATUS_EXT for block status.
  aio::Task<Result<void>> read_extended_chunk();
  // Dispatches one chunk of either header form.
  aio::Task<Result<void>> read_chunk(Pending& pending, uint16_t flags, uint16_t type,
                                     uint32_t length);
  aio::Task<Result<void>> read_block_status_ext_chunk(Pending& pending, uint32_t length);
  // Whether `pending` may get a block status chunk now (a block status request, none yet).
  Result<void> check_block_status_chunk(const Pending& pending) const;
  // Records the first extent of a block status chunk and drops the `rest` of its payload.
  aio::Task<Result<void>> take_extent(Pending& pending, uint32_t context, uint64_t length,
                                      uint32_t flags, uint64_t rest);
  // The request header in the negotiated form.
  std::string request_header(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                             uint64_t length) const;
  aio::Task<Result<void>> read_data_chunk(Pending& pending, uint32_t length);
  aio::Task<Result<void>> read_hole_chunk(Pending& pending, uint32_t length);
  aio::Task<Result<void>> read_block_status_chunk(Pending& pending, uint32_t length);
  aio::Task<Result<void>> read_error_chunk(Pending& pending, uint16_t type, uint32_t length);
  // Marks `pending` finished: validates what it received and wakes its requester.
  void complete(Pending& pending);
  // Breaks the connection with `reason`; every pending request fails.
  void fail_all(const std::string& reason);
  Pending* find(uint64_t cookie);

  Transport* transport_;
  ExportInfo info_;
  bool broken_ = false;
  std::string failure_;
  uint64_t next_cookie_ = 1;
  std::unordered_map<uint64_t, Pending*> pending_;
  size_t in_flight_ = 0;
  size_t unfinished_ = 0;  // registered requests whose reply is not complete
  bool reader_running_ = false;
  aio::CoQueue slot_waiters_;
  aio::CoMutex send_lock_;
  // Holds the reader; declared last so that it is destroyed first.
  aio::TaskGroup readers_;
};

// Maps an NBD wire error to the host errno (QEMU's nbd_errno_to_system_errno).
int host_errno(uint32_t wire_error);

}  // namespace strata::nbd
