#pragma once
// Blocking HTTP(S) transfers with libcurl, for the http/https driver (http_node.h). Each call
// runs on the calling thread (the driver runs them on a thread pool) with an easy handle kept per
// thread, so connections to the origin are reused between requests.
//
// Error texts are QEMU's (block/curl.c): "CURL: Error opening file: <libcurl's message>" at
// open, "Server does not support 'range' (byte ranges)." and "Server didn't report file size.".

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace strata::block::http {

struct CurlSettings {
  std::string url;
  uint32_t timeout_seconds = 5;  // 0: none
  bool ssl_verify = true;
  std::optional<std::string> cookie;
  std::optional<std::string> username;
  std::optional<std::string> proxy_username;
};

// QEMU's curl_header_cb: whether one response header line says "Accept-Ranges: bytes" (the
// name in any case, blanks around the value).
bool header_accepts_byte_ranges(std::string_view line);

// QEMU's curl_open: a HEAD request; the length of the resource, which must accept byte ranges.
Result<uint64_t> probe_length(const CurlSettings& settings);

// GETs [offset, offset + length) into `out` (exactly `length` bytes, or an EIO error), retrying
// a failed transfer `retries` more times.
Result<void> fetch_range(const CurlSettings& settings, uint64_t offset, uint64_t length, char* out,
                         int retries);

}  // namespace strata::block::http
