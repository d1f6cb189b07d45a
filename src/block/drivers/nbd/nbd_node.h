#pragma once
// The `nbd` driver: a block node whose data lives on an NBD server (QEMU's block/nbd.c).
//
// Options are QEMU's BlockdevOptionsNbd: server (unix path or inet host/port; also the legacy
// flat path/host/port members), export, x-dirty-bitmap, reconnect-delay, open-timeout,
// tls-creds (a tls-creds-x509/psk object with endpoint=client: NBD_OPT_STARTTLS right after the
// greeting, every later byte over TLS) and tls-hostname (the name an x509 server certificate must
// carry; the inet host by default, unchecked over a unix socket).
//
// Connection life: open connects (retrying for open-timeout seconds) and runs the handshake on a
// private loop; requests use the connection from their own loop (an idle connection moves to the
// loop of the next request, so format drivers may read during their open on a private loop).
// When a request finds the connection broken, a background task on that loop reconnects
// (backing off up to 2 s between tries, forever). Requests that find it broken wait while
// reconnect-delay seconds since the break have not passed and are re-sent once a new connection is
// up; after that they, and requests issued before the next successful reconnect, fail with EIO
// (QEMU's semantics).

#include <memory>
#include <optional>
#include <string>

#include "aio/sync.h"
#include "aio/task_group.h"
#include "block/drivers/driver.h"
#include "crypto/tls_creds.h"
#include "nbd/client_connection.h"
#include "nbd/client_socket.h"

namespace strata::block {

struct NbdOptions : DriverOptions {
  nbd::ServerAddress server;
  std::optional<std::string> export_name;
  std::optional<std::string> dirty_bitmap;  // x-dirty-bitmap: a qemu:dirty-bitmap:NAME context
  uint32_t reconnect_delay = 0;             // seconds
  uint32_t open_timeout = 0;                // seconds
  std::optional<std::string> tls_creds;
  std::optional<std::string> tls_hostname;
};

class NbdNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  NbdNode(CommonOptions common, const NbdOptions& options);
  ~NbdNode() override;

  const char* driver_name() const override { return "nbd"; }
  std::optional<std::string> exact_filename() const override;
  nlohmann::json strong_options() const override;

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  aio::Task<Result<void>> co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                     uint32_t flags) override;
  aio::Task<Result<void>> co_flush() override;
  aio::Task<Result<void>> co_pdiscard(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_pwrite_zeroes(uint64_t offset, uint64_t bytes,
                                           uint32_t flags) override;
  aio::Task<Result<BlockStatus>> co_block_status(uint64_t offset, uint64_t bytes) override;
  aio::Task<Result<void>> co_truncate(uint64_t new_size, bool exact) override;
  uint64_t length() const override { return info_.size; }
  std::optional<uint64_t> allocated_size() const override { return std::nullopt; }

 private:
  // One connection: the socket, its transport on the home loop and the protocol state. Shared by
  // the reader and the requests using it, so a broken one lives until its last user leaves.
  struct Session;
  enum class State {
    kConnected,  // session_ carries requests
    kWaiting,    // reconnecting; requests wait (within reconnect-delay)
    kFailing,    // reconnecting; requests fail at once
  };

  // Connects and runs the handshake on `loop`; checks that the export did not change.
  aio::Task<Result<std::shared_ptr<Session>>> establish(aio::EventLoop& loop);
  // Opens the first connection during open(), on a private loop, honouring open-timeout.
  Result<void> connect_at_open();
  // The connection to send the next request on, started on the current loop if needed; waits
  // while reconnecting within reconnect-delay.
  aio::Task<Result<std::shared_ptr<Session>>> usable_session();
  // After `session` failed a request: true when the request should be sent again.
  bool retry_after(const Session& session);
  // Serves `session` from the calling coroutine's loop: creates its connection, or moves an
  // idle one over from the loop it was used on last (open-time reads run on private loops).
  Result<void> bind_to_current_loop(Session& session);
  aio::Task<void> reconnect();
  aio::Task<void> end_wait_after_delay(uint64_t generation);
  void set_state(State state);
  nlohmann::json server_json() const;

  NbdOptions options_nbd_;
  std::shared_ptr<const crypto::TlsCreds> tls_creds_;  // nullptr: plain NBD
  nbd::ClientHandshakeRequest handshake_;
  nbd::ExportInfo info_;
  aio::EventLoop* loop_ = nullptr;  // the home loop, set by the first request
  std::shared_ptr<Session> session_;
  State state_ = State::kConnected;
  uint64_t break_generation_ = 0;  // counts breaks, so a stale delay timer does nothing
  aio::CoQueue state_changed_;
  aio::TaskGroup tasks_;  // the reconnect loop and delay timers
};

}  // namespace strata::block
