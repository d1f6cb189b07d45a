#pragma once
// The client side of the NBD fixed newstyle handshake (doc/proto.md "Option haggling"; QEMU's
// nbd_receive_negotiate). Speaks only to a Transport, so it runs over a socket and over the
// in-memory streams of tests and the fuzz target.
//
// Asks for structured replies, one meta context (base:allocation or a qemu: context such as
// qemu:dirty-bitmap:NAME) and the export with NBD_INFO_BLOCK_SIZE through OPT_GO, falling back to
// EXPORT_NAME when the server does not know OPT_GO; with TLS credentials, starts TLS first. Every
// server string and payload is bounded; a server that breaks the protocol gets a clear error, never
// an unbounded read.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aio/task.h"
#include "base/result.h"
#include "crypto/tls_creds.h"
#include "nbd/tls_transport.h"
#include "nbd/transport.h"

namespace strata::nbd {

struct ClientHandshakeRequest {
  std::string export_name;
  // The meta context to select for BLOCK_STATUS, or nullopt for none.
  std::optional<std::string> meta_context = "base:allocation";
  // Ask for NBD_OPT_EXTENDED_HEADERS (64-bit request and reply headers) before structured
  // replies; a server that refuses gets structured replies asked for instead.
  bool extended_headers = true;
};

// What the server granted for the selected export.
struct ExportInfo {
  uint64_t size = 0;
  uint16_t flags = 0;  // transmission flags (kFlagReadOnly, kFlagSendFlush, ...)
  // NBD_INFO_BLOCK_SIZE; 0 when the server did not send it.
  uint32_t min_block = 0;
  uint32_t preferred_block = 0;
  uint32_t max_block = 0;
  bool structured_replies = false;
  bool extended_headers = false;  // implies structured_replies
  // The server selected the requested meta context under this id.
  bool has_meta_context = false;
  uint32_t meta_context_id = 0;
};

struct ExportListing {
  std::string name;
  std::string description;
  // Filled when the listing describes each export (qemu-nbd --list):
  ExportInfo info;                         // NBD_OPT_INFO: size, flags, block sizes
  std::vector<std::string> meta_contexts;  // NBD_OPT_LIST_META_CONTEXT, all of them
  bool extended_headers = false;           // the server granted NBD_OPT_EXTENDED_HEADERS
};

// TLS for a client connection (QEMU's nbd_receive_starttls): asked for with NBD_OPT_STARTTLS
// right after the greeting; once the server agrees, the TLS handshake runs over the plain
// transport and every later byte goes through `transport`.
struct ClientTls {
  std::shared_ptr<const crypto::TlsCreds> creds;  // client endpoint
  // x509: the name the server certificate must carry (unchecked when unset).
  std::optional<std::string> hostname;
  std::unique_ptr<TlsTransport> transport;  // set by the handshake
};

// Runs the handshake up to the start of transmission; with `tls`, over TLS (the caller then
// uses tls->transport for the transmission phase).
aio::Task<Result<ExportInfo>> client_handshake(Transport& transport,
                                               const ClientHandshakeRequest& request,
                                               ClientTls* tls = nullptr);
// Lists the server's exports (NBD_OPT_LIST, then NBD_OPT_ABORT); with `describe`, also asks for
// extended headers and each export's information and meta contexts, as qemu-nbd --list does.
aio::Task<Result<std::vector<ExportListing>>> client_list_exports(Transport& transport,
                                                                  ClientTls* tls = nullptr,
                                                                  bool describe = false);

}  // namespace strata::nbd
