#pragma once
// TlsSession: one GnuTLS session whose ciphertext goes through memory buffers instead of a
// socket, so the caller decides how bytes travel (strata's coroutine transports; see
// nbd/tls_transport.h). Nothing here blocks or suspends: when GnuTLS needs ciphertext it has not
// been given, the call reports kNeedInput and the caller feeds more with feed().
//
// Ciphertext produced by any call (handshake messages, records, alerts) accumulates until
// take_output(); the caller must send it in the order taken.
//
// Peer checks after the handshake follow QEMU's qcrypto_tls_session_check_credentials: for x509
// credentials with verify-peer, the peer chain must verify against the CA ("The certificate
// hasn't got a known issuer", ...), be within its validity times, match `hostname` (client side)
// and, on the server, pass the authorization callback with its distinguished name ("TLS x509
// authz check for DN is denied"). PSK sessions are not checked further (as QEMU).
//
// Threading: one session is used by one thread at a time.

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"
#include "crypto/tls_creds.h"

namespace strata::crypto {

class TlsSession {
 public:
  enum class Status { kDone, kNeedInput };
  // Decides whether a client's x509 distinguished name may connect (a server's tls-authz).
  using Authorizer = std::function<Result<void>(const std::string& distinguished_name)>;

  // A server session; `authorize` may be empty (any client with a valid certificate).
  static Result<std::unique_ptr<TlsSession>> server(std::shared_ptr<const TlsCreds> creds,
                                                    Authorizer authorize);
  // A client session; x509 creds with verify-peer need `hostname` (checked against the server's
  // certificate and sent as SNI).
  static Result<std::unique_ptr<TlsSession>> client(std::shared_ptr<const TlsCreds> creds,
                                                    std::optional<std::string> hostname);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // Ciphertext received from the peer.
  void feed(const char* data, size_t length);
  // Ciphertext to send to the peer (empties the buffer).
  std::string take_output();
  bool has_output() const { return !output_.empty(); }

  // Advances the handshake; kDone once it finished and the peer passed the checks above.
  // Errors: "TLS handshake failed: <gnutls text>" or the peer check's text.
  Result<Status> handshake();
  // Decrypts into `buffer`: the byte count (> 0), or 0 with kNeedInput semantics (feed more).
  // The peer closing the session is an error ("TLS session closed by peer").
  Result<size_t> read(void* buffer, size_t length);
  // Encrypts all of `data` into the output buffer.
  Result<void> write(const void* data, size_t length);
  // Queues a close_notify alert.
  void bye();

  // After the handshake: the peer's certificate distinguished name (x509 with verify-peer) or
  // PSK username (server side); empty otherwise.
  const std::string& peer_name() const { return peer_name_; }

 private:
  TlsSession() = default;
  static Result<std::unique_ptr<TlsSession>> create(std::shared_ptr<const TlsCreds> creds,
                                                    TlsEndpoint endpoint);
  Result<void> check_peer();
  static long push(void* self, const void* data, size_t length);
  static long pull(void* self, void* data, size_t length);

  std::shared_ptr<const TlsCreds> creds_;
  void* handle_ = nullptr;  // gnutls_session_t
  TlsEndpoint endpoint_ = TlsEndpoint::kServer;
  std::optional<std::string> hostname_;
  Authorizer authorize_;
  std::string input_;
  size_t input_begin_ = 0;
  std::string output_;
  std::string peer_name_;
  bool handshake_done_ = false;
};

}  // namespace strata::crypto
