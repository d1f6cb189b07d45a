#pragma once
// NBD URIs as filenames (QEMU's nbd_parse_uri and the NBD URI spec, doc/uri.md):
//   nbd://host[:port]/export   nbd+tcp://...   (inet; port 10809 by default)
//   nbd+unix:///export?socket=/path            (unix socket; no host or port)
//   nbds://, nbds+tcp://, nbds+unix://         (TLS, with libnbd's query parameters:
//       tls-certificates=DIR (x509: DIR/ca-cert.pem, client-cert.pem, client-key.pem),
//       tls-psk-file=FILE (PSK, user from tls-username= or user@), tls-hostname=NAME,
//       tls-verify-peer=false; QEMU itself has no nbds URIs)
// The export name is the path without its leading '/', percent-decoded; an empty path names the
// default export "". Anything else (unknown query parameters, a host with nbd+unix, ...) is
// "No valid URL specified", as in QEMU.

#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace strata::block {

// True for a filename that starts with one of the NBD URI schemes above.
bool is_nbd_uri(std::string_view filename);

// What an nbds:// URI asks for; the caller makes client credentials of it.
struct NbdUriTls {
  std::optional<std::string> certificates;  // x509 credentials directory
  std::optional<std::string> psk_file;      // PSK keys file (username:hexkey lines)
  std::optional<std::string> username;      // PSK user
  std::optional<std::string> hostname;      // the name the server certificate must carry
  bool verify_peer = true;
};

// The `nbd` blockdev options (JSON form: driver, server, export) for an NBD URI. An nbds URI
// fills `tls` (refused when `tls` is nullptr).
Result<nlohmann::json> nbd_uri_options(std::string_view uri,
                                       std::optional<NbdUriTls>* tls = nullptr);

}  // namespace strata::block
