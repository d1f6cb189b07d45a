#pragma once
// ServerConnection: the server side of one NBD connection, from the greeting to the end of
// transmission (QEMU's nbd/server.c client). It speaks only to a Transport, so the same state
// machine serves sockets in the daemon and in-memory byte streams in tests and the fuzz target.
//
// Handshake: fixed newstyle; EXPORT_NAME, GO, INFO (export, name, description, block size),
// LIST, ABORT, STRUCTURED_REPLY, EXTENDED_HEADERS, LIST_/SET_META_CONTEXT (base:allocation,
// qemu:allocation-depth, qemu:dirty-bitmap:NAME), STARTTLS (server_starttls.cc; refused with
// NBD_REP_ERR_POLICY "TLS not configured" unless set_tls() was called).
// Transmission: READ (sparse structured replies), WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE,
// BLOCK_STATUS, DISC. Requests are read in order and served concurrently; replies go out as each
// request finishes, one reply at a time on the wire.
//
// Limits (each a disconnect or an error reply, never unbounded memory): option payloads over
// 32 MiB end the connection; names over 4096 bytes are refused; READ/CACHE over 32 MiB get
// EINVAL and the connection lives; a WRITE over 32 MiB gets EINVAL and the connection ends (its
// payload is not read); at most kMaxRequests requests and kMaxBufferedBytes of payload are held
// per connection; every reply string is shorter than 4096 bytes.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "aio/sync.h"
#include "aio/task.h"
#include "aio/task_group.h"
#include "crypto/tls_session.h"
#include "nbd/buffer_pool.h"
#include "nbd/export.h"
#include "nbd/transport.h"

namespace strata::nbd {

// TLS for a server (nbd-server-start tls-creds / tls-authz). `authorize` may be empty.
struct ServerTls {
  std::shared_ptr<const crypto::TlsCreds> creds;
  crypto::TlsSession::Authorizer authorize;
};

class ServerConnection final : public Closable {
 public:
  static constexpr size_t kMaxRequests = 64;
  static constexpr uint64_t kMaxBufferedBytes = 64ull << 20;
  // Option payloads up to this size are read whole; larger ones (still within 32 MiB) are
  // skipped and refused with NBD_REP_ERR_TOO_BIG.
  static constexpr uint32_t kMaxOptionRead = 1u << 20;

  ServerConnection(Transport& transport, const ExportDirectory& exports);
  ~ServerConnection() override;
  ServerConnection(const ServerConnection&) = delete;
  ServerConnection& operator=(const ServerConnection&) = delete;

  // Serves the connection until the client leaves, a protocol error ends it, or close() is
  // called. Returns once every request has finished; the transport may then be closed.
  aio::Task<void> run();
  // Ends the connection: stops reading and fails pending socket operations.
  void close() override;
  // The handshake is over and an export was selected.
  bool in_transmission() const { return export_ != nullptr; }
  // Requires TLS (the spec's forced TLS): before STARTTLS only STARTTLS and ABORT are served.
  // Call before run(); `tls` must outlive the connection.
  void set_tls(const ServerTls* tls) { tls_ = tls; }

 private:
  enum class Mode { kSimple, kStructured, kExtended };
  enum class OptionResult { kContinue, kSelected, kClose };
  struct Request;
  struct MetaContexts {
    std::shared_ptr<Export> exp;  // the export the selection applies to
    bool base_allocation = false;
    bool allocation_depth = false;
    std::vector<bool> bitmaps;  // parallel to the export's bitmap list
    size_t count() const;
  };

  aio::Task<bool> negotiate();
  aio::Task<OptionResult> handle_option(uint32_t option, uint32_t length);
  // Forced TLS before STARTTLS (server_starttls.cc).
  aio::Task<OptionResult> handle_option_before_tls(uint32_t option, uint32_t length);
  aio::Task<OptionResult> start_tls();
  aio::Task<OptionResult> handle_export_name(const std::string& payload);
  aio::Task<OptionResult> handle_info(uint32_t option, const std::string& payload);
  aio::Task<OptionResult> handle_meta_context(uint32_t option, const std::string& payload);
  aio::Task<bool> send_option_reply(uint32_t option, uint32_t type, std::string_view data);
  aio::Task<bool> send_option_error(uint32_t option, uint32_t type, std::string message);
  std::shared_ptr<Export> find_export(std::string_view name) const;

  aio::Task<void> transmission();
  aio::Task<void> handle_request(std::unique_ptr<Request> request);
  aio::Task<void> do_read(Request& request);
  aio::Task<void> do_block_status(Request& request);
  aio::Task<Result<void>> collect_extents(uint32_t context, uint64_t offset, uint64_t length,
                                          uint32_t max_extents,
                                          std::vector<std::pair<uint64_t, uint64_t>>& out);

  // Replies. Each takes the send lock for the whole reply.
  aio::Task<void> send_iov(std::vector<iovec> iov);
  std::string chunk_header(const Request& request, uint16_t flags, uint16_t type,
                           uint64_t length) const;
  aio::Task<void> send_simple(const Request& request, uint32_t error);
  aio::Task<void> send_error(const Request& request, uint32_t error, const std::string& message);
  aio::Task<void> send_result(const Request& request, const Result<void>& result);

  // The transport the protocol runs over: the caller's, then the TLS one after STARTTLS.
  class CurrentTransport final : public Transport {
   public:
    explicit CurrentTransport(Transport& base) : current_(&base) {}
    aio::Task<bool> read_exact(void* buffer, size_t length) override {
      return current_->read_exact(buffer, length);
    }
    aio::Task<bool> write_all(std::span<const iovec> iov) override {
      return current_->write_all(iov);
    }
    void shutdown() override { current_->shutdown(); }
    void set_io_loop(aio::EventLoop* io_loop) override { current_->set_io_loop(io_loop); }
    void replace(Transport& next) { current_ = &next; }

   private:
    Transport* current_;
  };

  Transport& base_transport_;
  std::unique_ptr<Transport> tls_transport_;  // after STARTTLS
  CurrentTransport channel_;
  Transport& transport_;  // channel_
  const ServerTls* tls_ = nullptr;
  const ExportDirectory& exports_;
  Mode mode_ = Mode::kSimple;
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool closing_ = false;
  MetaContexts contexts_;
  std::shared_ptr<Export> export_;
  bool registered_ = false;

  aio::CoMutex send_lock_;
  BufferPool buffers_;  // before requests_: request frames return their buffers to it
  aio::TaskGroup requests_;
  size_t in_flight_ = 0;
  uint64_t in_flight_bytes_ = 0;
  aio::Event slot_free_;
};

}  // namespace strata::nbd
