#pragma once
// NBD URIs as filenames (QEMU's nbd_parse_uri and the NBD URI spec, doc/uri.md):
//   nbd://host[:port]/export   nbd+tcp://...   (inet; port 10809 by default)
//   nbd+unix:///export?socket=/path            (unix socket; no host or port)
//   nbds://, nbds+tcp://, nbds+unix://         (TLS: refused, this build has no TLS)
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

// The `nbd` blockdev options (JSON form: driver, server, export) for an NBD URI.
Result<nlohmann::json> nbd_uri_options(std::string_view uri);

}  // namespace strata::block
