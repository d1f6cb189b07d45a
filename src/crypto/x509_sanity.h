#pragma once
// The checks QEMU's tls-creds-x509 `sanity-check=on` runs on its own files before using them
// (crypto/tlscredsx509.c): validity times, basic constraints, key usage and purpose of the
// certificate and of every CA certificate, and that the certificate verifies against the CAs.
// Errors carry QEMU's texts.

#include <optional>
#include <string>

#include "base/result.h"

namespace strata::crypto {

// QEMU's reason text for a non-zero gnutls verification status.
std::string verify_status_reason(unsigned status);

Result<void> x509_sanity_check(const std::string& ca_cert_file,
                               const std::optional<std::string>& cert_file, bool server);

}  // namespace strata::crypto
