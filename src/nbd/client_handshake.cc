#include "nbd/client_handshake.h"

#include <fmt/format.h>
#include <cstdio>

#include "nbd/protocol.h"

namespace strata::nbd {

namespace {

// "IHAVEOPT" in place of the oldstyle handshake's export size.
constexpr uint64_t kOldstyleMagic = 0x00420281861253ull;
// Largest option reply payload accepted: a LIST entry holds two strings of at most 4096 bytes.
constexpr uint32_t kMaxOptionReply = 2 * kMaxStringSize + 64;

struct OptionReply {
  uint32_t type = 0;
  std::string payload;
};

Error protocol_error(std::string message) {
  return Error(ErrorKind::kProtocol, std::move(message), EIO);
}

std::string hex(uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof(text), "%x", value);
  return text;
}

bool is_power_of_two(uint32_t value) {
  return value != 0 && (value & (value - 1)) == 0;
}

// A bound on the meta contexts one export may list (QEMU keeps every one; a hostile server could
// send them forever).
constexpr size_t kMaxListedContexts = 4096;

class ClientHandshake {
 public:
  explicit ClientHandshake(Transport& transport) : transport_(&transport) {}

  // Reads the server greeting and sends the client flags.
  aio::Task<Result<void>> greet() {
    char greeting[18];
    bool got = co_await transport_->read_exact(greeting, sizeof(greeting));
    if (!got) {
      co_return protocol_error("Failed to read initial magic");
    }
    WireReader reader(greeting, sizeof(greeting));
    if (reader.u64() != kInitMagic) {
      co_return protocol_error("Bad initial magic received");
    }
    uint64_t magic = reader.u64();
    if (magic == kOldstyleMagic) {
      co_return protocol_error("Server uses the oldstyle NBD handshake, which is not supported");
    }
    if (magic != kOptMagic) {
      co_return protocol_error("Bad server magic received");
    }
    uint16_t server_flags = reader.u16();
    if ((server_flags & kFlagFixedNewstyle) == 0) {
      co_return protocol_error("Server does not support the fixed newstyle handshake");
    }
    no_zeroes_ = (server_flags & kFlagNoZeroes) != 0;
    std::string out;
    WireWriter(out).u32(kClientFixedNewstyle | (no_zeroes_ ? kClientNoZeroes : 0));
    if (!(co_await write(out))) {
      co_return protocol_error("Failed to send client flags");
    }
    co_return ok();
  }

  aio::Task<bool> send_option(uint32_t option, std::string_view payload) {
    std::string out;
    WireWriter w(out);
    w.u64(kOptMagic);
    w.u32(option);
    w.u32(static_cast<uint32_t>(payload.size()));
    w.bytes(payload);
    bool sent = co_await write(out);
    co_return sent;
  }

  // Receives one reply to `option`, payload included.
  aio::Task<Result<OptionReply>> receive_reply(uint32_t option) {
    char header[20];
    bool got = co_await transport_->read_exact(header, sizeof(header));
    if (!got) {
      co_return protocol_error("failed to read option reply");
    }
    WireReader reader(header, sizeof(header));
    uint64_t magic = reader.u64();
    uint32_t replied_option = reader.u32();
    OptionReply reply;
    reply.type = reader.u32();
    uint32_t length = reader.u32();
    if (magic != kRepMagic) {
      co_return protocol_error("Unexpected option reply magic");
    }
    if (replied_option != option) {
      co_return protocol_error("Unexpected option type " + hex(replied_option) + " expected " +
                               hex(option));
    }
    if (length > kMaxOptionReply) {
      co_return protocol_error("server's reply to option " + std::string(option_name(option)) +
                               " is too long (" + std::to_string(length) + " bytes)");
    }
    reply.payload.resize(length);
    got = co_await transport_->read_exact(reply.payload.data(), length);
    if (!got) {
      co_return protocol_error("failed to read option reply payload");
    }
    co_return reply;
  }

  // QEMU's nbd_handle_reply_err: the message for an error reply (never NBD_REP_ERR_UNSUP, which
  // callers treat as "not supported, carry on").
  static Error reply_error(uint32_t option, const OptionReply& reply) {
    std::string what = std::to_string(option) + " (" + option_name(option) + ")";
    std::string message;
    switch (reply.type) {
      case kRepErrPolicy:
        message = "Denied by server for option " + what;
        break;
      case kRepErrInvalid:
        message = "Invalid parameters for option " + what;
        break;
      case kRepErrPlatform:
        message = "Server lacks support for option " + what;
        break;
      case kRepErrTlsReqd:
        message = "TLS negotiation required before option " + what;
        break;
      case kRepErrUnknown:
        message = "Requested export not available";
        break;
      case kRepErrShutdown:
        message = "Server shutting down before option " + what;
        break;
      case kRepErrBlockSizeReqd:
        message = "Server requires INFO_BLOCK_SIZE for option " + what;
        break;
      case kRepErrTooBig:
        message = "Server considers option " + what + " too large";
        break;
      default:
        message = "Unknown error code when asking for option " + what;
        break;
    }
    if (!reply.payload.empty()) {
      message += "\nserver reported: " + reply.payload;
    }
    return Error(ErrorKind::kIo, message, EINVAL);
  }

  // NBD_OPT_STARTTLS, then the TLS handshake; later options go over TLS.
  aio::Task<Result<void>> start_tls(ClientTls& tls) {
    if (!(co_await send_option(kOptStartTls, {}))) {
      co_return protocol_error("failed to send option starttls");
    }
    auto reply = co_await receive_reply(kOptStartTls);
    if (!reply) {
      co_return std::move(reply).error();
    }
    // QEMU's nbd_request_simple_option wording.
    if (reply->type == kRepErrUnsup) {
      (void)co_await send_option(kOptAbort, {});
      co_return Error(ErrorKind::kUnsupported, "Server don't support STARTTLS option", ENOTSUP);
    }
    if ((reply->type & kRepErrorBit) != 0) {
      (void)co_await send_option(kOptAbort, {});
      co_return reply_error(kOptStartTls, *reply);
    }
    if (reply->type != kRepAck) {
      (void)co_await send_option(kOptAbort, {});
      co_return protocol_error(
          fmt::format("Server answered option {} ({}) with unexpected reply {} ({})", kOptStartTls,
                      option_name(kOptStartTls), reply->type, reply_name(reply->type)));
    }
    if (!reply->payload.empty()) {
      (void)co_await send_option(kOptAbort, {});
      co_return protocol_error(
          fmt::format("Option {} ('{}') response length is {} (it should be zero)", kOptStartTls,
                      option_name(kOptStartTls), reply->payload.size()));
    }
    auto secured = co_await TlsTransport::connect(*transport_, tls.creds, tls.hostname);
    if (!secured) {
      co_return std::move(secured).error();
    }
    tls.transport = std::move(secured).value();
    transport_ = tls.transport.get();
    co_return ok();
  }

  aio::Task<Result<bool>> request_structured_replies() {
    if (!(co_await send_option(kOptStructuredReply, {}))) {
      co_return protocol_error("failed to send option structured reply");
    }
    auto reply = co_await receive_reply(kOptStructuredReply);
    if (!reply) {
      co_return std::move(reply).error();
    }
    if (reply->type == kRepAck) {
      if (!reply->payload.empty()) {
        co_return protocol_error("server sent a structured reply ack with a payload");
      }
      co_return true;
    }
    if ((reply->type & kRepErrorBit) != 0) {
      // Any refusal means "not granted" here, as QEMU's non-strict request (a server that
      // requires TLS first then refuses the next option with its own error).
      co_return false;
    }
    co_return protocol_error("unexpected reply type " + hex(reply->type) +
                             " to option structured reply");
  }

  // Returns the context id, or nullopt when the server selected nothing.
  aio::Task<Result<std::optional<uint32_t>>> set_meta_context(const std::string& export_name,
                                                              const std::string& context) {
    std::string payload;
    WireWriter w(payload);
    w.u32(static_cast<uint32_t>(export_name.size()));
    w.bytes(export_name);
    w.u32(1);
    w.u32(static_cast<uint32_t>(context.size()));
    w.bytes(context);
    if (!(co_await send_option(kOptSetMetaContext, payload))) {
      co_return protocol_error("failed to send option set meta context");
    }
    std::optional<uint32_t> selected;
    for (;;) {
      auto reply = co_await receive_reply(kOptSetMetaContext);
      if (!reply) {
        co_return std::move(reply).error();
      }
      if (reply->type == kRepAck) {
        if (!reply->payload.empty()) {
          co_return protocol_error("server sent a meta context ack with a payload");
        }
        co_return selected;
      }
      if (reply->type == kRepErrUnsup) {
        co_return std::optional<uint32_t>();
      }
      if ((reply->type & kRepErrorBit) != 0) {
        co_return reply_error(kOptSetMetaContext, *reply);
      }
      if (reply->type != kRepMetaContext || reply->payload.size() < 4) {
        co_return protocol_error("unexpected reply type " + hex(reply->type) +
                                 " to option set meta context");
      }
      WireReader reader(reply->payload.data(), reply->payload.size());
      uint32_t id = reader.u32();
      std::string name = reader.bytes(reader.remaining());
      if (name != context) {
        co_return protocol_error("Unexpected context name " + name.substr(0, 256) + " (expected " +
                                 context + ")");
      }
      if (selected) {
        co_return protocol_error("Server replied with more than one context");
      }
      selected = id;
    }
  }

  // OPT_GO with NBD_INFO_BLOCK_SIZE. Returns false (and touches nothing) when the server does
  // not know OPT_GO.
  aio::Task<Result<bool>> go(const std::string& export_name, ExportInfo& info) {
    auto went = co_await info_or_go(kOptGo, export_name, info);
    co_return went;
  }

  // OPT_INFO or OPT_GO (`option`) with NBD_INFO_BLOCK_SIZE; false when the server does not know
  // the option.
  aio::Task<Result<bool>> info_or_go(uint32_t option, const std::string& export_name,
                                     ExportInfo& info) {
    std::string payload;
    WireWriter w(payload);
    w.u32(static_cast<uint32_t>(export_name.size()));
    w.bytes(export_name);
    w.u16(1);
    w.u16(kInfoBlockSize);
    if (!(co_await send_option(option, payload))) {
      co_return protocol_error(std::string("failed to send option ") + option_name(option));
    }
    bool have_export = false;
    for (;;) {
      auto reply = co_await receive_reply(option);
      if (!reply) {
        co_return std::move(reply).error();
      }
      if (reply->type == kRepAck) {
        if (!have_export) {
          co_return protocol_error("broken server omitted NBD_INFO_EXPORT");
        }
        co_return true;
      }
      if (reply->type == kRepErrUnsup) {
        co_return false;
      }
      if ((reply->type & kRepErrorBit) != 0) {
        co_return reply_error(option, *reply);
      }
      if (reply->type != kRepInfo || reply->payload.size() < 2) {
        co_return protocol_error("unexpected reply type " + hex(reply->type) + " to option " +
                                 option_name(option));
      }
      WireReader reader(reply->payload.data(), reply->payload.size());
      uint16_t type = reader.u16();
      if (type == kInfoExport) {
        if (reply->payload.size() != 12) {
          co_return protocol_error("remaining export info len " +
                                   std::to_string(reply->payload.size() - 2) +
                                   " is unexpected size");
        }
        info.size = reader.u64();
        info.flags = reader.u16();
        have_export = true;
      } else if (type == kInfoBlockSize) {
        if (reply->payload.size() != 14) {
          co_return protocol_error("remaining export info len " +
                                   std::to_string(reply->payload.size() - 2) +
                                   " is unexpected size");
        }
        info.min_block = reader.u32();
        info.preferred_block = reader.u32();
        info.max_block = reader.u32();
        auto valid = check_block_sizes(info);
        if (!valid) {
          co_return std::move(valid).error();
        }
      }
      // Other information types are optional for the client to understand (proto.md).
    }
  }

  // QEMU's checks of NBD_INFO_BLOCK_SIZE values.
  static Result<void> check_block_sizes(const ExportInfo& info) {
    if (!is_power_of_two(info.min_block)) {
      return protocol_error("server minimum block size " + std::to_string(info.min_block) +
                            " is not a power of two");
    }
    if (info.min_block > 64 * 1024) {
      return protocol_error("server minimum block size " + std::to_string(info.min_block) +
                            " is too large");
    }
    if (!is_power_of_two(info.preferred_block) || info.preferred_block < info.min_block) {
      return protocol_error("server preferred block size " + std::to_string(info.preferred_block) +
                            " is not valid");
    }
    if (info.max_block < info.min_block || info.max_block % info.min_block != 0) {
      return protocol_error("server maximum block size " + std::to_string(info.max_block) +
                            " is not valid");
    }
    return ok();
  }

  // NBD_OPT_EXPORT_NAME: the fallback for servers without OPT_GO.
  aio::Task<Result<void>> export_name(const std::string& name, ExportInfo& info) {
    if (!(co_await send_option(kOptExportName, name))) {
      co_return protocol_error("failed to send export name");
    }
    char reply[10 + 124];
    size_t length = no_zeroes_ ? 10 : sizeof(reply);
    bool got = co_await transport_->read_exact(reply, length);
    if (!got) {
      co_return protocol_error("Failed to read export length");
    }
    WireReader reader(reply, length);
    info.size = reader.u64();
    info.flags = reader.u16();
    co_return ok();
  }

  aio::Task<Result<std::vector<ExportListing>>> list() {
    if (!(co_await send_option(kOptList, {}))) {
      co_return protocol_error("failed to send option list");
    }
    std::vector<ExportListing> exports;
    for (;;) {
      auto reply = co_await receive_reply(kOptList);
      if (!reply) {
        co_return std::move(reply).error();
      }
      if (reply->type == kRepAck) {
        break;
      }
      if ((reply->type & kRepErrorBit) != 0) {
        co_return reply_error(kOptList, *reply);
      }
      WireReader reader(reply->payload.data(), reply->payload.size());
      uint32_t name_length = reader.u32();
      if (reply->type != kRepServer || reader.failed() || name_length > reader.remaining()) {
        co_return protocol_error("incorrect option length " +
                                 std::to_string(reply->payload.size()));
      }
      ExportListing listing;
      listing.name = reader.bytes(name_length);
      listing.description = reader.bytes(reader.remaining());
      exports.push_back(std::move(listing));
    }
    co_return exports;
  }

  // NBD_OPT_ABORT as a courtesy when a listing is done (the server may close without reading it).
  aio::Task<void> abort() {
    bool aborted = co_await send_option(kOptAbort, {});
    (void)aborted;
  }

  // NBD_OPT_EXTENDED_HEADERS: true when granted, false when the server does not know it.
  aio::Task<Result<bool>> request_extended_headers() {
    if (!(co_await send_option(kOptExtendedHeaders, {}))) {
      co_return protocol_error("failed to send option extended headers");
    }
    auto reply = co_await receive_reply(kOptExtendedHeaders);
    if (!reply) {
      co_return std::move(reply).error();
    }
    if (reply->type == kRepAck && reply->payload.empty()) {
      co_return true;
    }
    if ((reply->type & kRepErrorBit) != 0) {
      co_return false;  // not granted, whatever the reason (as for structured replies)
    }
    co_return protocol_error("unexpected reply type " + hex(reply->type) +
                             " to option extended headers");
  }

  // NBD_OPT_LIST_META_CONTEXT without queries: every context the export offers.
  aio::Task<Result<std::vector<std::string>>> list_meta_contexts(const std::string& export_name) {
    std::string payload;
    WireWriter w(payload);
    w.u32(static_cast<uint32_t>(export_name.size()));
    w.bytes(export_name);
    w.u32(0);
    if (!(co_await send_option(kOptListMetaContext, payload))) {
      co_return protocol_error("failed to send option list meta context");
    }
    std::vector<std::string> contexts;
    for (;;) {
      auto reply = co_await receive_reply(kOptListMetaContext);
      if (!reply) {
        co_return std::move(reply).error();
      }
      if (reply->type == kRepAck) {
        co_return contexts;
      }
      if (reply->type == kRepErrUnsup) {
        co_return std::vector<std::string>();
      }
      if ((reply->type & kRepErrorBit) != 0) {
        co_return reply_error(kOptListMetaContext, *reply);
      }
      if (reply->type != kRepMetaContext || reply->payload.size() < 4) {
        co_return protocol_error("unexpected reply type " + hex(reply->type) +
                                 " to option list meta context");
      }
      if (contexts.size() >= kMaxListedContexts) {
        co_return protocol_error("server listed more than " + std::to_string(kMaxListedContexts) +
                                 " meta contexts");
      }
      contexts.push_back(reply->payload.substr(4));
    }
  }

 private:
  aio::Task<bool> write(const std::string& bytes) {
    iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
    bool written = co_await transport_->write_all(std::span<const iovec>(&iov, 1));
    co_return written;
  }

  Transport* transport_;
  bool no_zeroes_ = false;
};

}  // namespace

aio::Task<Result<ExportInfo>> client_handshake(Transport& transport,
                                               const ClientHandshakeRequest& request,
                                               ClientTls* tls) {
  if (request.export_name.size() > kMaxStringSize) {
    co_return Error(ErrorKind::kInvalidArgument, "export name too long to send to server", EINVAL);
  }
  ClientHandshake handshake(transport);
  auto greeted = co_await handshake.greet();
  if (greeted && tls != nullptr) {
    greeted = co_await handshake.start_tls(*tls);
  }
  if (!greeted) {
    co_return std::move(greeted).error();
  }
  ExportInfo info;
  // Extended headers first (they imply structured replies), as QEMU 10's client asks.
  Result<bool> structured = false;
  if (request.extended_headers) {
    auto extended = co_await handshake.request_extended_headers();
    if (!extended) {
      co_return std::move(extended).error();
    }
    info.extended_headers = *extended;
    structured = *extended;
  }
  if (!*structured) {
    structured = co_await handshake.request_structured_replies();
  }
  if (!structured) {
    co_return std::move(structured).error();
  }
  info.structured_replies = *structured;
  if (info.structured_replies && request.meta_context) {
    auto context = co_await handshake.set_meta_context(request.export_name, *request.meta_context);
    if (!context) {
      co_return std::move(context).error();
    }
    if (*context) {
      info.has_meta_context = true;
      info.meta_context_id = **context;
    }
  }
  auto went = co_await handshake.go(request.export_name, info);
  if (!went) {
    co_return std::move(went).error();
  }
  if (!*went) {
    auto exported = co_await handshake.export_name(request.export_name, info);
    if (!exported) {
      co_return std::move(exported).error();
    }
  }
  co_return info;
}

aio::Task<Result<std::vector<ExportListing>>> client_list_exports(Transport& transport,
                                                                  ClientTls* tls, bool describe) {
  ClientHandshake handshake(transport);
  auto greeted = co_await handshake.greet();
  if (greeted && tls != nullptr) {
    greeted = co_await handshake.start_tls(*tls);
  }
  if (!greeted) {
    co_return std::move(greeted).error();
  }
  if (!describe) {
    auto exports = co_await handshake.list();
    co_await handshake.abort();
    co_return exports;
  }
  // QEMU's nbd_receive_export_list: extended headers (else structured replies) first, then the
  // list, then NBD_OPT_INFO and the meta contexts of each export.
  auto extended = co_await handshake.request_extended_headers();
  if (!extended) {
    co_return std::move(extended).error();
  }
  bool structured = *extended;
  if (!structured) {
    auto granted = co_await handshake.request_structured_replies();
    if (!granted) {
      co_return std::move(granted).error();
    }
    structured = *granted;
  }
  auto exports = co_await handshake.list();
  if (!exports) {
    co_return std::move(exports).error();
  }
  for (ExportListing& listing : *exports) {
    listing.extended_headers = *extended;
    auto described = co_await handshake.info_or_go(kOptInfo, listing.name, listing.info);
    if (!described) {
      co_return std::move(described).error();
    }
    if (structured) {
      auto contexts = co_await handshake.list_meta_contexts(listing.name);
      if (!contexts) {
        co_return std::move(contexts).error();
      }
      listing.meta_contexts = std::move(contexts).value();
    }
  }
  co_await handshake.abort();
  co_return exports;
}

}  // namespace strata::nbd
