#pragma once
// Filenames that name a remote protocol node instead of a host file: http:// and https:// URLs
// (the curl drivers) and NBD URIs (nbd_uri.h). QEMU's path_has_protocol lets such names through
// to their protocol drivers, also as an image's stored backing file name, where they are not
// combined with the image's directory. The schemes are matched as QEMU's bdrv_find_protocol does,
// with their case. Other protocol-looking names (json:, nbd:host:port, file:) are not URLs here.

#include <string_view>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace strata::block {

// "http://..." or "https://...".
bool is_http_url(std::string_view name);
// An http(s) URL or an NBD URI.
bool is_remote_url(std::string_view name);

// Whether a backing file name stands on its own rather than relative to the image's directory
// (QEMU's path_combine leaves absolute paths and protocol names alone): an absolute path or a
// remote URL.
bool names_itself(std::string_view backing_name);

// The protocol node's options for a remote URL: {"driver": "http"|"https", "url": URL} or the
// nbd options of nbd_uri_options (nbds URIs, which need client credentials, are refused).
Result<nlohmann::json> remote_url_options(std::string_view url);

}  // namespace strata::block
