// Decoding of the `nbd` driver's options (QEMU's BlockdevOptionsNbd, plus the legacy flat
// path/host/port members of -drive and filename strings).

#include <array>
#include <limits>

#include "block/drivers/nbd/nbd_node.h"

namespace strata::block {

namespace {

constexpr std::array<std::string_view, 4> kAddressTypes = {"inet", "unix", "vsock", "fd"};

void fail(ArgDecoder& d, std::string message) {
  d.fail(Error(ErrorKind::kInvalidArgument, std::move(message), EINVAL));
}

// A u32 member given in seconds.
uint32_t seconds(ArgDecoder& d, std::string_view name) {
  auto value = d.opt_u64(name);
  if (!value) {
    return 0;
  }
  if (*value > std::numeric_limits<uint32_t>::max()) {
    fail(d, "Parameter '" + d.full_name(name) + "' expects uint32_t");
    return 0;
  }
  return static_cast<uint32_t>(*value);
}

// SocketAddress (flat union on `type`); only unix and inet are supported.
void parse_server(ArgDecoder& d, NbdOptions& options) {
  auto server = d.opt_object("server");
  if (!server) {
    return;
  }
  std::string type = server->enumeration("type", kAddressTypes);
  if (type == "unix") {
    options.server.type = nbd::ServerAddress::Type::kUnix;
    options.server.path = server->str("path");
    auto abstract = server->opt_bool("abstract");
    (void)server->opt_bool("tight");
    if (abstract.value_or(false)) {
      fail(*server, "Abstract unix socket addresses are not supported by this build");
    }
  } else if (type == "inet") {
    options.server.type = nbd::ServerAddress::Type::kInet;
    options.server.host = server->str("host");
    options.server.port = server->str("port");
    // Hints that do not change where a client connects.
    (void)server->opt_bool("numeric");
    (void)server->opt_bool("keep-alive");
    (void)server->opt_bool("ipv4");
    (void)server->opt_bool("ipv6");
  } else if (!server->failed()) {
    fail(*server, "NBD server address type '" + type + "' is not supported by this build");
  }
  ignore_error(server->finish(), "recorded in the shared decoder state");
}

}  // namespace

std::unique_ptr<DriverOptions> NbdNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<NbdOptions>();
  const bool has_server = d.has("server");
  parse_server(d, *options);
  // QEMU's nbd_process_legacy_socket_options.
  auto path = d.opt_str("path");
  auto host = d.opt_str("host");
  auto port = d.opt_str("port");
  if (path || host || port) {
    if (has_server) {
      fail(d, "Cannot use 'server' and path/host/port at the same time");
    } else if (path && host) {
      fail(d, "path and host may not be used at the same time");
    } else if (path) {
      if (port) {
        fail(d, "port may not be used without host");
      }
      options->server.type = nbd::ServerAddress::Type::kUnix;
      options->server.path = *path;
    } else if (host) {
      options->server.type = nbd::ServerAddress::Type::kInet;
      options->server.host = *host;
      options->server.port = port.value_or(nbd::kDefaultPort);
    } else {
      fail(d, "port may not be used without host");
    }
  } else if (!has_server && !d.failed()) {
    fail(d, "Parameter '" + d.full_name("server") + "' is missing");
  }
  options->export_name = d.opt_str("export");
  options->tls_creds = d.opt_str("tls-creds");
  options->tls_hostname = d.opt_str("tls-hostname");
  options->dirty_bitmap = d.opt_str("x-dirty-bitmap");
  options->reconnect_delay = seconds(d, "reconnect-delay");
  options->open_timeout = seconds(d, "open-timeout");
  return options;
}

}  // namespace strata::block
