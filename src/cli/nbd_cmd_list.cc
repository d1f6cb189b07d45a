// `strata nbd --list` (qemu-nbd -L): connects to a server as a client, lists its exports with
// each one's size, flags, block sizes and meta contexts, and prints them in qemu-nbd's format.

#include <unistd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cli/nbd_cmd_internal.h"
#include "daemon/daemon.h"
#include "nbd/client_handshake.h"
#include "nbd/client_socket.h"
#include "nbd/protocol.h"
#include "nbd/transport.h"

namespace strata::cli::nbd_cmd {

namespace {

// Connects, starts TLS when `creds` is set, and lists with descriptions.
aio::Task<Result<std::vector<nbd::ExportListing>>> fetch_listing(
    aio::EventLoop& loop, nbd::ServerAddress address, std::shared_ptr<const crypto::TlsCreds> creds,
    std::optional<std::string> hostname) {
  auto fd = co_await nbd::connect_to_server(loop, address);
  if (!fd) {
    co_return std::move(fd).error();
  }
  Result<std::vector<nbd::ExportListing>> listed = std::vector<nbd::ExportListing>();
  {
    nbd::SocketTransport transport(loop, *fd);
    std::optional<nbd::ClientTls> tls;
    if (creds != nullptr) {
      tls.emplace();
      tls->creds = std::move(creds);
      tls->hostname = std::move(hostname);
    }
    listed = co_await nbd::client_list_exports(transport, tls ? &*tls : nullptr, true);
  }  // the TLS session goes before the transport under it
  ::close(*fd);
  co_return listed;
}

// qemu-nbd's names of transmission flag bits (bit 0, "has flags", is not printed).
const char* flag_name(unsigned bit) {
  static const char* const kNames[] = {
      nullptr, "readonly", "flush", "fua",       "rotational",          "trim", "zeroes", "df",
      "multi", "resize",   "cache", "fast-zero", "block-status-payload"};
  return bit < std::size(kNames) ? kNames[bit] : nullptr;
}

void print_listing(const std::vector<nbd::ExportListing>& exports) {
  std::printf("exports available: %zu\n", exports.size());
  for (const nbd::ExportListing& e : exports) {
    std::printf(" export: '%s'\n", e.name.c_str());
    if (!e.description.empty()) {
      std::printf("  description: %s\n", e.description.c_str());
    }
    if ((e.info.flags & nbd::kFlagHasFlags) != 0) {
      std::printf("  size:  %llu\n", static_cast<unsigned long long>(e.info.size));
      std::printf("  flags: 0x%x (", e.info.flags);
      for (unsigned bit = 0; bit < 16; ++bit) {
        const char* name = flag_name(bit);
        if (name != nullptr && (e.info.flags & (1u << bit)) != 0) {
          std::printf(" %s", name);
        }
      }
      std::printf(" )\n");
    }
    if (e.info.min_block != 0) {
      std::printf("  min block: %u\n", e.info.min_block);
      std::printf("  opt block: %u\n", e.info.preferred_block);
      std::printf("  max block: %u\n", e.info.max_block);
    }
    std::printf("  transaction size: %s\n", e.extended_headers ? "64-bit" : "32-bit");
    if (!e.meta_contexts.empty()) {
      std::printf("  available meta contexts: %zu\n", e.meta_contexts.size());
      for (const std::string& context : e.meta_contexts) {
        std::printf("   %s\n", context.c_str());
      }
    }
  }
}

}  // namespace

int list_exports(const Options& o, daemon::Daemon& daemon, aio::EventLoop& loop) {
  std::shared_ptr<const crypto::TlsCreds> creds;
  if (o.tls_creds) {
    auto found = daemon.crypto_objects().find_tls_creds(*o.tls_creds, crypto::TlsEndpoint::kClient,
                                                        daemon.has_iothread(*o.tls_creds));
    if (!found) {
      report("Failed to get TLS creds: " + found.error().message());
      return 1;
    }
    creds = std::move(found).value();
  }
  nbd::ServerAddress address;
  std::optional<std::string> hostname = o.tls_hostname;
  if (o.socket_path) {
    address.type = nbd::ServerAddress::Type::kUnix;
    address.path = *o.socket_path;
  } else {
    address.type = nbd::ServerAddress::Type::kInet;
    address.host = o.bind_address;
    address.port = o.port;
    if (!hostname) {
      hostname = o.bind_address;  // qemu-nbd checks the certificate against -b
    }
  }
  auto listed = loop.block_on(fetch_listing(loop, address, std::move(creds), hostname));
  if (!listed) {
    report(listed.error().message());
    return 1;
  }
  print_listing(*listed);
  return 0;
}

}  // namespace strata::cli::nbd_cmd
