#include "block/drivers/http/http_options.h"

namespace strata::block::http {

namespace {

Error invalid(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL);
}

}  // namespace

HttpOptions parse_http_options(ArgDecoder& d, std::string_view scheme) {
  HttpOptions options;
  options.scheme = std::string(scheme);
  options.url = d.str("url");
  options.readahead = d.opt_i64("readahead");
  options.timeout = d.opt_i64("timeout");
  options.username = d.opt_str("username");
  options.password_secret = d.opt_str("password-secret");
  options.proxy_username = d.opt_str("proxy-username");
  options.proxy_password_secret = d.opt_str("proxy-password-secret");
  options.cookie = d.opt_str("cookie");
  options.cookie_secret = d.opt_str("cookie-secret");
  if (scheme == "https") {
    options.sslverify = d.opt_bool("sslverify");
  }
  return options;
}

Result<void> check_http_options(const HttpOptions& options) {
  if (options.readahead) {
    if (*options.readahead < 0) {
      return invalid("Value '" + std::to_string(*options.readahead) +
                     "' is out of range for parameter 'readahead'");
    }
    if (*options.readahead % 512 != 0) {
      return invalid("HTTP_READAHEAD_SIZE " + std::to_string(*options.readahead) +
                     " is not a multiple of 512");
    }
  }
  if (options.timeout && (*options.timeout < 0 || *options.timeout > kMaxTimeoutSeconds)) {
    return invalid("timeout parameter is too large or negative");
  }
  if (options.cookie && options.cookie_secret) {
    return invalid("curl driver cannot handle both cookie and cookie secret");
  }
  const std::string prefix = options.scheme + "://";
  if (options.url.rfind(prefix, 0) != 0) {
    return invalid(options.scheme + " curl driver cannot handle the URL '" + options.url +
                   "' (does not start with '" + prefix + "')");
  }
  return ok();
}

nlohmann::json strong_http_options(const HttpOptions& options) {
  nlohmann::json strong = {{"url", options.url}};
  auto put = [&strong](const char* name, const std::optional<std::string>& value) {
    if (value) {
      strong[name] = *value;
    }
  };
  if (options.sslverify) {
    strong["sslverify"] = *options.sslverify;
  }
  put("cookie", options.cookie);
  put("cookie-secret", options.cookie_secret);
  put("username", options.username);
  put("password-secret", options.password_secret);
  put("proxy-username", options.proxy_username);
  put("proxy-password-secret", options.proxy_password_secret);
  return strong;
}

bool url_names_node(const HttpOptions& options) {
  return options.verify_peer() && !options.cookie && !options.cookie_secret && !options.username &&
         !options.password_secret && !options.proxy_username && !options.proxy_password_secret;
}

}  // namespace strata::block::http
