// STARTTLS and the spec's forced-TLS rules for ServerConnection (QEMU nbd/server.c
// nbd_negotiate_options with tlscreds set, nbd_negotiate_handle_starttls).
//
// Before TLS: STARTTLS (no payload) is acknowledged and the TLS handshake runs; STARTTLS with a
// payload is refused with NBD_REP_ERR_INVALID and the connection ends; EXPORT_NAME cannot carry
// an error and ends the connection; every other option, ABORT included, gets NBD_REP_ERR_TLS_REQD
// "Option 0xN not permitted before TLS" (after ABORT the connection ends). No option changes
// connection state before TLS, so nothing of the plaintext phase survives STARTTLS; bytes the
// client sent after STARTTLS are read as TLS records, never as options.

#include <cstdio>

#include "nbd/protocol.h"
#include "nbd/server_connection.h"
#include "nbd/server_connection_internal.h"
#include "nbd/tls_transport.h"

namespace strata::nbd {

aio::Task<ServerConnection::OptionResult> ServerConnection::handle_option_before_tls(
    uint32_t option, uint32_t length) {
  if (option == kOptExportName) {
    co_return OptionResult::kClose;  // "Option 0x1 not permitted before TLS", no reply possible
  }
  if (option == kOptStartTls) {
    if (length != 0) {
      // QEMU drops the connection when a client cannot start TLS correctly.
      bool skipped = co_await transport_.discard(length);
      if (skipped) {
        co_await send_option_error(
            option, kRepErrInvalid,
            "option '" + std::string(option_name(option)) + "' has unexpected length");
      }
      co_return OptionResult::kClose;
    }
    co_return co_await start_tls();
  }
  // The payload is dropped unread as far as the protocol goes (QEMU's nbd_opt_drop).
  bool skipped = co_await transport_.discard(length);
  if (!skipped) {
    co_return OptionResult::kClose;
  }
  char message[64];
  std::snprintf(message, sizeof(message), "Option 0x%x not permitted before TLS", option);
  bool sent = co_await send_option_error(option, kRepErrTlsReqd, message);
  if (!sent || option == kOptAbort) {
    co_return OptionResult::kClose;
  }
  co_return OptionResult::kContinue;
}

aio::Task<ServerConnection::OptionResult> ServerConnection::start_tls() {
  bool acked = co_await send_option_reply(kOptStartTls, kRepAck, {});
  if (!acked) {
    co_return OptionResult::kClose;
  }
  auto tls = co_await TlsTransport::accept(base_transport_, tls_->creds, tls_->authorize);
  if (!tls) {
    // QEMU logs "TLS handshake failed" and drops the client; the alert (if any) went out.
    co_return OptionResult::kClose;
  }
  if (closing_) {
    co_return OptionResult::kClose;
  }
  tls_transport_ = std::move(tls).value();
  channel_.replace(*tls_transport_);
  // Fresh protocol state for the TLS phase (nothing could be negotiated before, but be explicit).
  mode_ = Mode::kSimple;
  contexts_ = MetaContexts{};
  co_return OptionResult::kContinue;
}

}  // namespace strata::nbd
