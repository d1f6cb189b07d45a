#include "crypto/tls_session.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include "crypto/x509_sanity.h"

namespace strata::crypto {

namespace {

gnutls_session_t as_session(void* handle) {
  return static_cast<gnutls_session_t>(handle);
}

Error tls_error(std::string message) {
  return make_error(ErrorKind::kProtocol, message);
}

}  // namespace

Result<std::unique_ptr<TlsSession>> TlsSession::create(std::shared_ptr<const TlsCreds> creds,
                                                       TlsEndpoint endpoint) {
  if (creds->endpoint() != endpoint) {
    return make_error(ErrorKind::kInvalidArgument, "Credentials endpoint doesn't match session");
  }
  std::unique_ptr<TlsSession> session(new TlsSession());
  session->creds_ = std::move(creds);
  session->endpoint_ = endpoint;
  gnutls_session_t handle = nullptr;
  unsigned flags =
      (endpoint == TlsEndpoint::kServer ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NONBLOCK;
  int rc = gnutls_init(&handle, flags);
  if (rc < 0) {
    return tls_error(std::string("Cannot initialize TLS session: ") + gnutls_strerror(rc));
  }
  session->handle_ = handle;
  std::string priority = session->creds_->session_priority();
  rc = gnutls_priority_set_direct(handle, priority.c_str(), nullptr);
  if (rc < 0) {
    return tls_error("Unable to set TLS session priority " + priority + ": " + gnutls_strerror(rc));
  }
  auto applied = session->creds_->apply(handle);
  if (!applied) {
    return std::move(applied).error();
  }
  gnutls_transport_set_ptr(handle, session.get());
  gnutls_transport_set_push_function(
      handle, [](gnutls_transport_ptr_t self, const void* data, size_t length) -> ssize_t {
        return push(self, data, length);
      });
  gnutls_transport_set_pull_function(
      handle, [](gnutls_transport_ptr_t self, void* data, size_t length) -> ssize_t {
        return pull(self, data, length);
      });
  return session;
}

Result<std::unique_ptr<TlsSession>> TlsSession::server(std::shared_ptr<const TlsCreds> creds,
                                                       Authorizer authorize) {
  auto session = create(std::move(creds), TlsEndpoint::kServer);
  if (session) {
    (*session)->authorize_ = std::move(authorize);
  }
  return session;
}

Result<std::unique_ptr<TlsSession>> TlsSession::client(std::shared_ptr<const TlsCreds> creds,
                                                       std::optional<std::string> hostname) {
  auto session = create(std::move(creds), TlsEndpoint::kClient);
  if (session && hostname) {
    (*session)->hostname_ = hostname;
    gnutls_server_name_set(as_session((*session)->handle_), GNUTLS_NAME_DNS, hostname->data(),
                           hostname->size());
  }
  return session;
}

TlsSession::~TlsSession() {
  if (handle_ != nullptr) {
    gnutls_deinit(as_session(handle_));
  }
}

long TlsSession::push(void* self, const void* data, size_t length) {
  auto* session = static_cast<TlsSession*>(self);
  session->output_.append(static_cast<const char*>(data), length);
  return static_cast<long>(length);
}

long TlsSession::pull(void* self, void* data, size_t length) {
  auto* session = static_cast<TlsSession*>(self);
  size_t available = session->input_.size() - session->input_begin_;
  if (available == 0) {
    gnutls_transport_set_errno(as_session(session->handle_), EAGAIN);
    return -1;
  }
  size_t n = std::min(length, available);
  std::memcpy(data, session->input_.data() + session->input_begin_, n);
  session->input_begin_ += n;
  if (session->input_begin_ == session->input_.size()) {
    session->input_.clear();
    session->input_begin_ = 0;
  }
  return static_cast<long>(n);
}

void TlsSession::feed(const char* data, size_t length) {
  if (input_begin_ > 0 && input_begin_ == input_.size()) {
    input_.clear();
    input_begin_ = 0;
  }
  input_.append(data, length);
}

std::string TlsSession::take_output() {
  return std::exchange(output_, std::string());
}

Result<TlsSession::Status> TlsSession::handshake() {
  if (handshake_done_) {
    return Status::kDone;
  }
  int rc = gnutls_handshake(as_session(handle_));
  if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
    return Status::kNeedInput;
  }
  if (rc < 0) {
    return tls_error(std::string("TLS handshake failed: ") + gnutls_strerror(rc));
  }
  auto checked = check_peer();
  if (!checked) {
    return std::move(checked).error();
  }
  handshake_done_ = true;
  return Status::kDone;
}

Result<void> TlsSession::check_peer() {
  gnutls_session_t handle = as_session(handle_);
  if (gnutls_auth_get_type(handle) == GNUTLS_CRD_PSK) {
    if (endpoint_ == TlsEndpoint::kServer) {
      const char* username = gnutls_psk_server_get_username(handle);
      peer_name_ = username != nullptr ? username : "";
    }
    return ok();
  }
  if (!creds_->verify_peer()) {
    return ok();
  }
  unsigned status = 0;
  int rc = gnutls_certificate_verify_peers2(handle, &status);
  if (rc < 0) {
    return tls_error(std::string("Verify failed: ") + gnutls_strerror(rc));
  }
  if (status != 0) {
    return tls_error(verify_status_reason(status));
  }
  unsigned count = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(handle, &count);
  if (certs == nullptr || count == 0) {
    return tls_error("No certificate peers");
  }
  time_t now = std::time(nullptr);
  for (unsigned i = 0; i < count; ++i) {
    gnutls_x509_crt_t cert = nullptr;
    rc = gnutls_x509_crt_init(&cert);
    if (rc < 0) {
      return tls_error(std::string("Cannot initialize certificate: ") + gnutls_strerror(rc));
    }
    struct Deinit {
      gnutls_x509_crt_t cert;
      ~Deinit() { gnutls_x509_crt_deinit(cert); }
    } deinit{cert};
    rc = gnutls_x509_crt_import(cert, &certs[i], GNUTLS_X509_FMT_DER);
    if (rc < 0) {
      return tls_error(std::string("Cannot import certificate: ") + gnutls_strerror(rc));
    }
    if (gnutls_x509_crt_get_expiration_time(cert) < now) {
      return tls_error("The certificate has expired");
    }
    if (gnutls_x509_crt_get_activation_time(cert) > now) {
      return tls_error("The certificate is not yet activated");
    }
    if (i != 0) {
      continue;
    }
    std::string dn(1024, '\0');
    size_t size = dn.size();
    rc = gnutls_x509_crt_get_dn(cert, dn.data(), &size);
    if (rc == GNUTLS_E_SHORT_MEMORY_BUFFER) {
      dn.resize(size);
      rc = gnutls_x509_crt_get_dn(cert, dn.data(), &size);
    }
    if (rc < 0) {
      return tls_error(std::string("Cannot get client distinguished name: ") + gnutls_strerror(rc));
    }
    dn.resize(size);
    peer_name_ = dn;
    if (authorize_) {
      auto allowed = authorize_(peer_name_);
      if (!allowed) {
        return allowed;
      }
    }
    if (hostname_) {
      if (!gnutls_x509_crt_check_hostname(cert, hostname_->c_str())) {
        return tls_error("Certificate does not match the hostname " + *hostname_);
      }
    } else if (endpoint_ == TlsEndpoint::kClient) {
      return tls_error("No hostname for certificate validation");
    }
  }
  return ok();
}

Result<size_t> TlsSession::read(void* buffer, size_t length) {
  while (true) {
    ssize_t n = gnutls_record_recv(as_session(handle_), buffer, length);
    if (n > 0) {
      return static_cast<size_t>(n);
    }
    if (n == 0) {
      return tls_error("TLS session closed by peer");
    }
    if (n == GNUTLS_E_AGAIN) {
      return size_t{0};
    }
    if (n == GNUTLS_E_INTERRUPTED || n == GNUTLS_E_REHANDSHAKE) {
      continue;  // a renegotiation request is ignored; nothing to do but read on
    }
    return tls_error(std::string("Cannot read from TLS channel: ") +
                     gnutls_strerror(static_cast<int>(n)));
  }
}

Result<void> TlsSession::write(const void* data, size_t length) {
  const char* bytes = static_cast<const char*>(data);
  int retries = 0;
  while (length > 0) {
    ssize_t n = gnutls_record_send(as_session(handle_), bytes, length);
    if ((n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) && ++retries < 16) {
      continue;  // the push side never blocks; retry as GnuTLS asks (bounded)
    }
    if (n < 0) {
      return tls_error(std::string("Cannot write to TLS channel: ") +
                       gnutls_strerror(static_cast<int>(n)));
    }
    bytes += n;
    length -= static_cast<size_t>(n);
  }
  return ok();
}

void TlsSession::bye() {
  if (handshake_done_) {
    (void)gnutls_bye(as_session(handle_), GNUTLS_SHUT_WR);
  }
}

}  // namespace strata::crypto
