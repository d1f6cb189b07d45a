#pragma once
// TlsTransport: a Transport that runs a TLS session over another Transport (the NBD server after
// STARTTLS; the NBD client for nbds:// and tls-creds). GnuTLS never touches the socket: the
// session reads and writes memory buffers (crypto/tls_session.h) and this class moves ciphertext
// with the lower transport's coroutine reads and writes, one TLS record at a time, so a slow or
// hostile peer only ever suspends its own coroutine.
//
// Record framing: bytes from the lower transport are taken as TLS records (5-byte header, at most
// kMaxRecord bytes of body); anything that is not — such as plaintext a client sent after
// STARTTLS — fails the handshake or the read, and the connection ends.
//
// Contract as Transport: one reader and any number of writers (writers serialised by the caller);
// ciphertext produced by reads (alerts, TLS 1.3 post-handshake messages) and by writes goes to
// the lower transport in the order it was produced. shutdown() shuts the lower transport down.

#include <memory>
#include <optional>
#include <string>

#include "aio/sync.h"
#include "crypto/tls_session.h"
#include "nbd/transport.h"

namespace strata::nbd {

class TlsTransport final : public Transport {
 public:
  // The largest record body accepted (TLS 1.2's 2^14 + 2048 ciphertext bound).
  static constexpr size_t kMaxRecord = 16384 + 2048;

  // Runs the server side of the handshake over `lower` (whose lifetime must cover the returned
  // transport). Errors: the handshake's or peer check's text (crypto::TlsSession).
  static aio::Task<Result<std::unique_ptr<TlsTransport>>> accept(
      Transport& lower, std::shared_ptr<const crypto::TlsCreds> creds,
      crypto::TlsSession::Authorizer authorize);
  // Runs the client side: x509 creds check the server certificate against `hostname`; PSK creds
  // send their username.
  static aio::Task<Result<std::unique_ptr<TlsTransport>>> connect(
      Transport& lower, std::shared_ptr<const crypto::TlsCreds> creds,
      std::optional<std::string> hostname);

  aio::Task<bool> read_exact(void* buffer, size_t length) override;
  aio::Task<bool> write_all(std::span<const iovec> iov) override;
  void shutdown() override;

  // Moves an idle session (no read or write under way, nothing buffered below) onto another
  // transport carrying the same byte stream: the NBD client's connection served from another
  // loop. The old lower transport must not be used again.
  void rebind(Transport& lower) { lower_ = &lower; }

  // The peer's x509 distinguished name or PSK username (server side), see TlsSession.
  const std::string& peer_name() const { return session_->peer_name(); }

 private:
  TlsTransport(Transport& lower, std::unique_ptr<crypto::TlsSession> session)
      : lower_(&lower), session_(std::move(session)) {}
  aio::Task<Result<void>> handshake();
  // Sends whatever ciphertext the session produced so far.
  aio::Task<bool> flush();
  // Reads one TLS record from the lower transport into the session.
  aio::Task<bool> read_record();

  Transport* lower_;
  std::unique_ptr<crypto::TlsSession> session_;
  aio::CoMutex send_lock_;
  bool failed_ = false;
};

}  // namespace strata::nbd
