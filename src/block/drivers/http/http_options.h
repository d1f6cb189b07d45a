#pragma once
// The options of the `http` and `https` drivers (QEMU's BlockdevOptionsCurlHttp and
// BlockdevOptionsCurlHttps) and the checks QEMU's curl_open makes of them, with its error texts.
//
// Members: url, readahead (bytes fetched past each read, default 256 KiB, a multiple of 512),
// timeout (seconds per request, default 5, at most 10000), cookie or cookie-secret, username,
// password-secret, proxy-username, proxy-password-secret, and for https only sslverify (default
// true). Secrets name `secret` objects.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "base/result.h"
#include "block/drivers/blockdev_options.h"

namespace strata::block::http {

inline constexpr int64_t kDefaultReadahead = 256 * 1024;
inline constexpr int64_t kDefaultTimeoutSeconds = 5;
inline constexpr int64_t kMaxTimeoutSeconds = 10000;

struct HttpOptions : DriverOptions {
  std::string scheme;  // "http" or "https": the driver's name
  std::string url;
  // As given: checked by check_http_options (QEMU checks them after the read-only test).
  std::optional<int64_t> readahead;
  std::optional<int64_t> timeout;
  std::optional<bool> sslverify;  // https only
  std::optional<std::string> cookie;
  std::optional<std::string> cookie_secret;
  std::optional<std::string> username;
  std::optional<std::string> password_secret;
  std::optional<std::string> proxy_username;
  std::optional<std::string> proxy_password_secret;

  uint64_t readahead_bytes() const {
    return static_cast<uint64_t>(readahead.value_or(kDefaultReadahead));
  }
  uint32_t timeout_seconds() const {
    return static_cast<uint32_t>(timeout.value_or(kDefaultTimeoutSeconds));
  }
  bool verify_peer() const { return sslverify.value_or(true); }
};

// Decodes the members of `scheme`'s driver (no checks beyond types).
HttpOptions parse_http_options(ArgDecoder& d, std::string_view scheme);

// QEMU's curl_open checks, in its order: readahead, timeout, cookie with cookie-secret, and the
// URL's scheme against the driver's.
Result<void> check_http_options(const HttpOptions& options);

// The options that change what the node reads (QEMU's curl_strong_runtime_opts), as given.
nlohmann::json strong_http_options(const HttpOptions& options);
// QEMU's curl_refresh_filename: the URL alone names the node unless sslverify is off or cookies
// or credentials are set.
bool url_names_node(const HttpOptions& options);

}  // namespace strata::block::http
