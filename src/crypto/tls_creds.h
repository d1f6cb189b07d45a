#pragma once
// TLS credentials: QEMU's `tls-creds-x509` and `tls-creds-psk` objects (crypto/tlscredsx509.c,
// crypto/tlscredspsk.c). Each loads its files from `dir` when created, with QEMU's file names and
// error texts, and holds the GnuTLS credentials every session made from it shares.
//
// x509 files: ca-cert.pem (required), server-cert.pem + server-key.pem (server, required),
// client-cert.pem + client-key.pem (client, optional), ca-crl.pem and dh-params.pem (optional).
// PSK: keys.psk with "username:hexkey" lines; a client uses the line of `username` ("qemu" when
// unset), a server accepts any user of the file.
//
// Thread-safety: immutable after creation; sessions on any thread may share one object.

#include <memory>
#include <optional>
#include <string>

#include "base/result.h"

namespace strata::crypto {

enum class TlsEndpoint { kServer, kClient };

class TlsCreds {
 public:
  virtual ~TlsCreds() = default;
  TlsEndpoint endpoint() const { return endpoint_; }
  const std::string& dir() const { return dir_; }
  // The GnuTLS priority string a session uses (the user's `priority` or the default, plus the
  // key-exchange additions the credential type needs).
  virtual std::string session_priority() const = 0;
  // Sets the credentials on a gnutls_session_t (passed as void* to keep GnuTLS out of headers).
  virtual Result<void> apply(void* gnutls_session) const = 0;
  // x509 only: the peer's certificate must be checked after the handshake.
  virtual bool verify_peer() const { return false; }

 protected:
  TlsCreds(TlsEndpoint endpoint, std::string dir, std::optional<std::string> priority)
      : endpoint_(endpoint), dir_(std::move(dir)), priority_(std::move(priority)) {}
  // QEMU's build default (CONFIG_TLS_PRIORITY).
  static constexpr const char* kDefaultPriority = "NORMAL";
  std::string base_priority() const { return priority_.value_or(kDefaultPriority); }

 private:
  TlsEndpoint endpoint_;
  std::string dir_;
  std::optional<std::string> priority_;
};

struct TlsCredsX509Options {
  TlsEndpoint endpoint = TlsEndpoint::kClient;
  std::string dir;
  std::optional<std::string> priority;
  bool verify_peer = true;
  bool sanity_check = true;
};

// Loads the files of `options.dir`; errors carry QEMU's texts ("Unable to access credentials
// DIR/ca-cert.pem: No such file or directory", "Cannot load CA certificate ...").
Result<std::shared_ptr<const TlsCreds>> load_x509_creds(const TlsCredsX509Options& options);

struct TlsCredsPskOptions {
  TlsEndpoint endpoint = TlsEndpoint::kClient;
  std::string dir;
  std::optional<std::string> priority;
  std::optional<std::string> username;  // client only
  // Client only: this keys file instead of DIR/keys.psk (an nbds:// URI's tls-psk-file).
  std::optional<std::string> keys_file;
};

Result<std::shared_ptr<const TlsCreds>> load_psk_creds(const TlsCredsPskOptions& options);

}  // namespace strata::crypto
