#include "crypto/x509_sanity.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <ctime>
#include <fstream>
#include <sstream>
#include <vector>

namespace strata::crypto {

namespace {

constexpr unsigned kMaxCaCerts = 16;

Error invalid(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

Result<std::string> read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return make_error(ErrorKind::kIo, "Cannot load CA cert list " + path);
  }
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Owns the certificates it holds.
struct CertList {
  std::vector<gnutls_x509_crt_t> certs;
  CertList() = default;
  CertList(const CertList&) = delete;
  CertList& operator=(const CertList&) = delete;
  ~CertList() {
    for (auto cert : certs) {
      gnutls_x509_crt_deinit(cert);
    }
  }
};

Result<void> check_times(gnutls_x509_crt_t cert, const std::string& file, bool server, bool ca) {
  time_t now = std::time(nullptr);
  const char* role = ca ? "CA" : (server ? "server" : "client");
  if (gnutls_x509_crt_get_expiration_time(cert) < now) {
    return invalid(std::string("The ") + role + " certificate " + file + " has expired");
  }
  if (gnutls_x509_crt_get_activation_time(cert) > now) {
    return invalid(std::string("The ") + role + " certificate " + file + " is not yet active");
  }
  return ok();
}

Result<void> check_basic_constraints(gnutls_x509_crt_t cert, const std::string& file, bool server,
                                     bool ca) {
  int status = gnutls_x509_crt_get_basic_constraints(cert, nullptr, nullptr, nullptr);
  if (status > 0) {
    if (!ca) {
      return invalid("The certificate " + file +
                     " basic constraints show a CA, but we need one for a " +
                     (server ? "server" : "client"));
    }
  } else if (status == 0) {
    if (ca) {
      return invalid("The certificate " + file + " basic constraints do not show a CA");
    }
  } else if (status == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
    if (ca) {
      return invalid("The certificate " + file + " is missing basic constraints for a CA");
    }
  } else {
    return invalid("Unable to query certificate " + file +
                   " basic constraints: " + gnutls_strerror(status));
  }
  return ok();
}

Result<void> check_key_usage(gnutls_x509_crt_t cert, const std::string& file, bool ca) {
  unsigned usage = 0;
  unsigned critical = 0;
  int status = gnutls_x509_crt_get_key_usage(cert, &usage, &critical);
  if (status < 0) {
    if (status != GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
      return invalid("Unable to query certificate " + file +
                     " key usage: " + gnutls_strerror(status));
    }
    usage = ca ? GNUTLS_KEY_KEY_CERT_SIGN
               : (GNUTLS_KEY_DIGITAL_SIGNATURE | GNUTLS_KEY_KEY_ENCIPHERMENT);
  }
  if (!critical) {
    return ok();
  }
  if (ca) {
    if (!(usage & GNUTLS_KEY_KEY_CERT_SIGN)) {
      return invalid("Certificate " + file + " usage does not permit certificate signing");
    }
    return ok();
  }
  if (!(usage & GNUTLS_KEY_DIGITAL_SIGNATURE)) {
    return invalid("Certificate " + file + " usage does not permit digital signature");
  }
  if (!(usage & GNUTLS_KEY_KEY_ENCIPHERMENT)) {
    return invalid("Certificate " + file + " usage does not permit key encipherment");
  }
  return ok();
}

Result<void> check_key_purpose(gnutls_x509_crt_t cert, const std::string& file, bool server) {
  bool allow_client = false;
  bool allow_server = false;
  bool critical = false;
  for (unsigned i = 0;; ++i) {
    char oid[256];
    size_t size = sizeof(oid);
    unsigned purpose_critical = 0;
    int status = gnutls_x509_crt_get_key_purpose_oid(cert, i, oid, &size, &purpose_critical);
    if (status == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
      if (i == 0) {
        allow_client = allow_server = true;
      }
      break;
    }
    if (status < 0) {
      return invalid("Unable to query certificate " + file +
                     " key purpose: " + gnutls_strerror(status));
    }
    critical |= purpose_critical != 0;
    std::string_view purpose(oid);
    if (purpose == GNUTLS_KP_TLS_WWW_SERVER) {
      allow_server = true;
    } else if (purpose == GNUTLS_KP_TLS_WWW_CLIENT) {
      allow_client = true;
    } else if (purpose == GNUTLS_KP_ANY) {
      allow_client = allow_server = true;
    }
  }
  if (server && !allow_server && critical) {
    return invalid("Certificate " + file + " purpose does not allow use with a TLS server");
  }
  if (!server && !allow_client && critical) {
    return invalid("Certificate " + file + " purpose does not allow use with a TLS client");
  }
  return ok();
}

Result<void> check_cert(gnutls_x509_crt_t cert, const std::string& file, bool server, bool ca) {
  auto checked = check_times(cert, file, server, ca);
  if (checked) {
    checked = check_basic_constraints(cert, file, server, ca);
  }
  if (checked) {
    checked = check_key_usage(cert, file, ca);
  }
  if (checked && !ca) {
    checked = check_key_purpose(cert, file, server);
  }
  return checked;
}

}  // namespace

// The reason texts QEMU gives for a failed verification status.
std::string verify_status_reason(unsigned status) {
  const char* reason = "Invalid certificate";
  if (status & GNUTLS_CERT_INVALID) {
    reason = "The certificate is not trusted";
  }
  if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) {
    reason = "The certificate hasn't got a known issuer";
  }
  if (status & GNUTLS_CERT_REVOKED) {
    reason = "The certificate has been revoked";
  }
  if (status & GNUTLS_CERT_INSECURE_ALGORITHM) {
    reason = "The certificate uses an insecure algorithm";
  }
  return reason;
}

Result<void> x509_sanity_check(const std::string& ca_cert_file,
                               const std::optional<std::string>& cert_file, bool server) {
  CertList cert;
  if (cert_file) {
    auto text = read_text(*cert_file);
    if (!text) {
      return std::move(text).error();
    }
    gnutls_x509_crt_t crt = nullptr;
    int rc = gnutls_x509_crt_init(&crt);
    if (rc < 0) {
      return invalid(std::string("Unable to initialize certificate: ") + gnutls_strerror(rc));
    }
    cert.certs.push_back(crt);
    gnutls_datum_t data{reinterpret_cast<unsigned char*>(text->data()),
                        static_cast<unsigned>(text->size())};
    rc = gnutls_x509_crt_import(crt, &data, GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
      return invalid(std::string("Unable to import ") + (server ? "server" : "client") +
                     " certificate " + *cert_file + ": " + gnutls_strerror(rc));
    }
  }
  CertList cas;
  {
    auto text = read_text(ca_cert_file);
    if (!text) {
      return std::move(text).error();
    }
    gnutls_x509_crt_t list[kMaxCaCerts];
    unsigned count = kMaxCaCerts;
    gnutls_datum_t data{reinterpret_cast<unsigned char*>(text->data()),
                        static_cast<unsigned>(text->size())};
    if (gnutls_x509_crt_list_import(list, &count, &data, GNUTLS_X509_FMT_PEM, 0) < 0) {
      return invalid("Unable to import CA certificate list " + ca_cert_file);
    }
    cas.certs.assign(list, list + count);
  }
  if (!cert.certs.empty()) {
    auto checked = check_cert(cert.certs[0], *cert_file, server, false);
    if (!checked) {
      return checked;
    }
  }
  for (auto ca : cas.certs) {
    auto checked = check_cert(ca, ca_cert_file, server, true);
    if (!checked) {
      return checked;
    }
  }
  if (!cert.certs.empty() && !cas.certs.empty()) {
    unsigned status = 0;
    if (gnutls_x509_crt_list_verify(cert.certs.data(), 1, cas.certs.data(),
                                    static_cast<unsigned>(cas.certs.size()), nullptr, 0, 0,
                                    &status) < 0) {
      return invalid(std::string("Unable to verify ") + (server ? "server" : "client") +
                     " certificate " + *cert_file + " against CA certificate " + ca_cert_file);
    }
    if (status != 0) {
      return invalid("Our own certificate " + *cert_file + " failed validation against " +
                     ca_cert_file + ": " + verify_status_reason(status));
    }
  }
  return ok();
}

}  // namespace strata::crypto
