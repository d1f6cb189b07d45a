#include "crypto/tls_creds.h"

#include <gnutls/gnutls.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "crypto/x509_sanity.h"

namespace strata::crypto {

namespace {

Error generic(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, message);
}

// QEMU's qcrypto_tls_creds_get_path: DIR/NAME when readable; nullopt when an optional file is
// absent; an error for a missing required file or any other access failure.
Result<std::optional<std::string>> credential_path(const std::string& dir, const char* name,
                                                   bool required) {
  std::string path = dir + "/" + name;
  if (::access(path.c_str(), R_OK) < 0) {
    int error = errno;
    if (error == ENOENT && !required) {
      return std::optional<std::string>();
    }
    return make_error(ErrorKind::kNotFound,
                      "Unable to access credentials " + path + ": " + std::strerror(error));
  }
  return std::optional<std::string>(path);
}

// dh-params.pem (PKCS#3 PEM) when present.
Result<gnutls_dh_params_t> load_dh_params(const std::optional<std::string>& path) {
  if (!path) {
    return gnutls_dh_params_t{nullptr};
  }
  std::ifstream in(*path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  std::string pem = text.str();
  gnutls_dh_params_t params = nullptr;
  int rc = gnutls_dh_params_init(&params);
  if (rc < 0) {
    return generic(std::string("Unable to initialize DH parameters: ") + gnutls_strerror(rc));
  }
  gnutls_datum_t datum{reinterpret_cast<unsigned char*>(pem.data()),
                       static_cast<unsigned>(pem.size())};
  rc = gnutls_dh_params_import_pkcs3(params, &datum, GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    gnutls_dh_params_deinit(params);
    return generic("Unable to load DH parameters from " + *path + ": " + gnutls_strerror(rc));
  }
  return params;
}

class X509Creds final : public TlsCreds {
 public:
  X509Creds(const TlsCredsX509Options& options)
      : TlsCreds(options.endpoint, options.dir, options.priority),
        verify_peer_(options.verify_peer) {}
  ~X509Creds() override {
    if (data_ != nullptr) {
      gnutls_certificate_free_credentials(data_);
    }
    if (dh_params_ != nullptr) {
      gnutls_dh_params_deinit(dh_params_);
    }
  }
  std::string session_priority() const override { return base_priority(); }
  Result<void> apply(void* session) const override {
    auto* handle = static_cast<gnutls_session_t>(session);
    int rc = gnutls_credentials_set(handle, GNUTLS_CRD_CERTIFICATE, data_);
    if (rc < 0) {
      return generic(std::string("Cannot set session credentials: ") + gnutls_strerror(rc));
    }
    if (endpoint() == TlsEndpoint::kServer) {
      // Requests but does not enforce a client certificate; the peer check enforces it.
      gnutls_certificate_server_set_request(handle, GNUTLS_CERT_REQUEST);
    }
    return ok();
  }
  bool verify_peer() const override { return verify_peer_; }

  gnutls_certificate_credentials_t data_ = nullptr;
  gnutls_dh_params_t dh_params_ = nullptr;

 private:
  bool verify_peer_;
};

class PskCreds final : public TlsCreds {
 public:
  explicit PskCreds(const TlsCredsPskOptions& options)
      : TlsCreds(options.endpoint, options.dir, options.priority) {}
  ~PskCreds() override {
    if (server_ != nullptr) {
      gnutls_psk_free_server_credentials(server_);
    }
    if (client_ != nullptr) {
      gnutls_psk_free_client_credentials(client_);
    }
    if (dh_params_ != nullptr) {
      gnutls_dh_params_deinit(dh_params_);
    }
  }
  std::string session_priority() const override {
    return base_priority() + ":+ECDHE-PSK:+DHE-PSK:+PSK";
  }
  Result<void> apply(void* session) const override {
    auto* handle = static_cast<gnutls_session_t>(session);
    int rc = endpoint() == TlsEndpoint::kServer
                 ? gnutls_credentials_set(handle, GNUTLS_CRD_PSK, server_)
                 : gnutls_credentials_set(handle, GNUTLS_CRD_PSK, client_);
    if (rc < 0) {
      return generic(std::string("Cannot set session credentials: ") + gnutls_strerror(rc));
    }
    return ok();
  }

  gnutls_psk_server_credentials_t server_ = nullptr;
  gnutls_psk_client_credentials_t client_ = nullptr;
  gnutls_dh_params_t dh_params_ = nullptr;
};

// QEMU's lookup_key: the hex key on the first "username:" line of the file.
Result<std::string> lookup_psk_key(const std::string& path, const std::string& username) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return make_error(ErrorKind::kIo, "Cannot read PSK file " + path + ": Failed to open file “" +
                                          path + "”: " + std::strerror(errno));
  }
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() > username.size() && line.compare(0, username.size(), username) == 0 &&
        line[username.size()] == ':') {
      return line.substr(username.size() + 1);
    }
  }
  return make_error(ErrorKind::kNotFound,
                    "Username " + username + " not found in PSK file " + path);
}

}  // namespace

Result<std::shared_ptr<const TlsCreds>> load_x509_creds(const TlsCredsX509Options& options) {
  const bool server = options.endpoint == TlsEndpoint::kServer;
  auto ca_cert = credential_path(options.dir, "ca-cert.pem", true);
  if (!ca_cert) {
    return std::move(ca_cert).error();
  }
  Result<std::optional<std::string>> ca_crl = std::optional<std::string>();
  if (server) {
    ca_crl = credential_path(options.dir, "ca-crl.pem", false);
    if (!ca_crl) {
      return std::move(ca_crl).error();
    }
  }
  auto cert = credential_path(options.dir, server ? "server-cert.pem" : "client-cert.pem", server);
  if (!cert) {
    return std::move(cert).error();
  }
  auto key = credential_path(options.dir, server ? "server-key.pem" : "client-key.pem", server);
  if (!key) {
    return std::move(key).error();
  }
  Result<std::optional<std::string>> dh_path = std::optional<std::string>();
  if (server) {
    dh_path = credential_path(options.dir, "dh-params.pem", false);
    if (!dh_path) {
      return std::move(dh_path).error();
    }
  }
  if (options.sanity_check) {
    auto sane = x509_sanity_check(**ca_cert, *cert, server);
    if (!sane) {
      return std::move(sane).error();
    }
  }

  auto creds = std::make_shared<X509Creds>(options);
  int rc = gnutls_certificate_allocate_credentials(&creds->data_);
  if (rc < 0) {
    return generic(std::string("Cannot allocate credentials: ") + gnutls_strerror(rc));
  }
  rc = gnutls_certificate_set_x509_trust_file(creds->data_, ca_cert->value().c_str(),
                                              GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    return generic("Cannot load CA certificate '" + **ca_cert + "': " + gnutls_strerror(rc));
  }
  if (cert->has_value() && key->has_value()) {
    rc = gnutls_certificate_set_x509_key_file2(
        creds->data_, cert->value().c_str(), key->value().c_str(), GNUTLS_X509_FMT_PEM, nullptr, 0);
    if (rc < 0) {
      return generic("Cannot load certificate '" + **cert + "' & key '" + **key +
                     "': " + gnutls_strerror(rc));
    }
  }
  if (ca_crl->has_value()) {
    rc = gnutls_certificate_set_x509_crl_file(creds->data_, ca_crl->value().c_str(),
                                              GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
      return generic("Cannot load CRL '" + **ca_crl + "': " + gnutls_strerror(rc));
    }
  }
  if (server) {
    auto dh = load_dh_params(*dh_path);
    if (!dh) {
      return std::move(dh).error();
    }
    creds->dh_params_ = *dh;
    if (creds->dh_params_ != nullptr) {
      gnutls_certificate_set_dh_params(creds->data_, creds->dh_params_);
    }
  }
  return std::shared_ptr<const TlsCreds>(std::move(creds));
}

Result<std::shared_ptr<const TlsCreds>> load_psk_creds(const TlsCredsPskOptions& options) {
  auto creds = std::make_shared<PskCreds>(options);
  if (options.endpoint == TlsEndpoint::kServer) {
    if (options.username) {
      return generic("username should not be set when endpoint=server");
    }
    auto dh_path = credential_path(options.dir, "dh-params.pem", false);
    if (!dh_path) {
      return std::move(dh_path).error();
    }
    auto psk_file = credential_path(options.dir, "keys.psk", true);
    if (!psk_file) {
      return std::move(psk_file).error();
    }
    int rc = gnutls_psk_allocate_server_credentials(&creds->server_);
    if (rc < 0) {
      return generic(std::string("Cannot allocate credentials: ") + gnutls_strerror(rc));
    }
    auto dh = load_dh_params(*dh_path);
    if (!dh) {
      return std::move(dh).error();
    }
    creds->dh_params_ = *dh;
    gnutls_psk_set_server_credentials_file(creds->server_, psk_file->value().c_str());
    if (creds->dh_params_ != nullptr) {
      gnutls_psk_set_server_dh_params(creds->server_, creds->dh_params_);
    }
  } else {
    Result<std::optional<std::string>> psk_file = std::optional<std::string>(options.keys_file);
    if (!options.keys_file) {
      psk_file = credential_path(options.dir, "keys.psk", true);
    }
    if (!psk_file) {
      return std::move(psk_file).error();
    }
    std::string username = options.username.value_or("qemu");
    auto hex_key = lookup_psk_key(**psk_file, username);
    if (!hex_key) {
      return std::move(hex_key).error();
    }
    int rc = gnutls_psk_allocate_client_credentials(&creds->client_);
    if (rc < 0) {
      return generic(std::string("Cannot allocate credentials: ") + gnutls_strerror(rc));
    }
    gnutls_datum_t key{reinterpret_cast<unsigned char*>(hex_key->data()),
                       static_cast<unsigned>(hex_key->size())};
    rc = gnutls_psk_set_client_credentials(creds->client_, username.c_str(), &key,
                                           GNUTLS_PSK_KEY_HEX);
    if (rc < 0) {
      return generic(std::string("Cannot set PSK client credentials: ") + gnutls_strerror(rc));
    }
  }
  return std::shared_ptr<const TlsCreds>(std::move(creds));
}

}  // namespace strata::crypto
