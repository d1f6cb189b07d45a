#include "block/drivers/nbd/nbd_uri.h"

#include <array>

#include "nbd/client_socket.h"

namespace strata::block {

namespace {

constexpr std::array<std::string_view, 6> kSchemes = {"nbd",  "nbd+tcp",  "nbd+unix",
                                                      "nbds", "nbds+tcp", "nbds+unix"};

Error invalid_url() {
  return Error(ErrorKind::kInvalidArgument, "No valid URL specified", EINVAL);
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') {
    return c - '0';
  }
  if (c >= 'a' && c <= 'f') {
    return c - 'a' + 10;
  }
  if (c >= 'A' && c <= 'F') {
    return c - 'A' + 10;
  }
  return -1;
}

// Percent-decoding of a URI component; nullopt for a malformed escape.
std::optional<std::string> unescape(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out.push_back(text[i]);
      continue;
    }
    if (i + 2 >= text.size()) {
      return std::nullopt;
    }
    int high = hex_digit(text[i + 1]);
    int low = hex_digit(text[i + 2]);
    if (high < 0 || low < 0) {
      return std::nullopt;
    }
    out.push_back(static_cast<char>(high * 16 + low));
    i += 2;
  }
  return out;
}

std::string_view scheme_of(std::string_view filename) {
  size_t colon = filename.find("://");
  if (colon == std::string_view::npos) {
    return {};
  }
  return filename.substr(0, colon);
}

}  // namespace

bool is_nbd_uri(std::string_view filename) {
  std::string_view scheme = scheme_of(filename);
  for (std::string_view known : kSchemes) {
    if (scheme == known) {
      return true;
    }
  }
  return false;
}

Result<nlohmann::json> nbd_uri_options(std::string_view uri, std::optional<NbdUriTls>* tls) {
  if (!is_nbd_uri(uri)) {
    return invalid_url();
  }
  std::string_view scheme = scheme_of(uri);
  const bool secure = scheme.substr(0, 4) == "nbds";
  if (secure && tls == nullptr) {
    return Error(ErrorKind::kUnsupported,
                 "TLS is not supported here (" + std::string(scheme) + ":// URI)", ENOTSUP);
  }
  const bool is_unix = scheme == "nbd+unix" || scheme == "nbds+unix";
  std::string_view rest = uri.substr(scheme.size() + 3);
  // authority [/path] [?query] [#fragment]
  std::string_view query;
  if (size_t hash = rest.find('#'); hash != std::string_view::npos) {
    rest = rest.substr(0, hash);
  }
  if (size_t question = rest.find('?'); question != std::string_view::npos) {
    query = rest.substr(question + 1);
    rest = rest.substr(0, question);
  }
  size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view() : rest.substr(slash);

  nlohmann::json options = {{"driver", "nbd"}};
  if (!path.empty() && path[0] == '/') {
    path.remove_prefix(1);
  }
  if (!path.empty()) {
    auto name = unescape(path);
    if (!name) {
      return invalid_url();
    }
    options["export"] = *name;
  }
  std::optional<std::string> user;
  if (size_t at = authority.rfind('@'); at != std::string_view::npos) {
    user = unescape(authority.substr(0, at));
    if (!user) {
      return invalid_url();
    }
    authority = authority.substr(at + 1);
  }
  // Query parameters (the last of a kind counts): "socket=PATH", required with +unix and
  // refused otherwise, as QEMU's; with nbds, libnbd's TLS parameters.
  std::optional<std::string> socket;
  NbdUriTls uri_tls;
  while (!query.empty()) {
    size_t end = query.find('&');
    std::string_view parameter = query.substr(0, end);
    query = end == std::string_view::npos ? std::string_view() : query.substr(end + 1);
    size_t equals = parameter.find('=');
    if (equals == std::string_view::npos) {
      return invalid_url();
    }
    std::string_view key = parameter.substr(0, equals);
    auto value = unescape(parameter.substr(equals + 1));
    if (!value) {
      return invalid_url();
    }
    if (key == "socket" && is_unix) {
      socket = std::move(value);
    } else if (key == "tls-certificates" && secure) {
      uri_tls.certificates = std::move(value);
    } else if (key == "tls-psk-file" && secure) {
      uri_tls.psk_file = std::move(value);
    } else if (key == "tls-username" && secure) {
      uri_tls.username = std::move(value);
    } else if (key == "tls-hostname" && secure) {
      uri_tls.hostname = std::move(value);
    } else if (key == "tls-verify-peer" && secure && (*value == "false" || *value == "true")) {
      uri_tls.verify_peer = *value == "true";
    } else {
      return invalid_url();
    }
  }
  if (secure) {
    if (!uri_tls.username) {
      uri_tls.username = std::move(user);
    }
    if (!uri_tls.certificates && !uri_tls.psk_file) {
      return make_error(
          ErrorKind::kInvalidArgument,
          std::string(scheme) + ":// needs tls-certificates=DIR (x509) or tls-psk-file=FILE (PSK)");
    }
    *tls = std::move(uri_tls);
  }
  if (is_unix) {
    if (!authority.empty() || !socket) {
      return invalid_url();
    }
    options["server"] = {{"type", "unix"}, {"path", *socket}};
    return options;
  }
  std::string host;
  std::string port;
  if (!authority.empty() && authority[0] == '[') {
    size_t close = authority.find(']');
    if (close == std::string_view::npos) {
      return invalid_url();
    }
    host = std::string(authority.substr(1, close - 1));
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') {
        return invalid_url();
      }
      port = std::string(after.substr(1));
    }
  } else {
    size_t colon = authority.find(':');
    host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = std::string(authority.substr(colon + 1));
    }
  }
  if (host.empty()) {
    return invalid_url();
  }
  for (char c : port) {
    if (c < '0' || c > '9') {
      return invalid_url();
    }
  }
  if (port.size() > 9) {
    return invalid_url();
  }
  const unsigned long number = port.empty() ? 0 : std::stoul(port);
  if (number > 65535) {
    return invalid_url();
  }
  port = number == 0 ? std::string(nbd::kDefaultPort) : std::to_string(number);
  options["server"] = {{"type", "inet"}, {"host", host}, {"port", port}};
  return options;
}

}  // namespace strata::block
