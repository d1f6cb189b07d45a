// The handshake of ServerConnection: greeting, options, export selection.

#include "nbd/server_connection.h"

#include <algorithm>
#include <cstring>

#include "block/io/request.h"
#include "nbd/allocation.h"
#include "nbd/protocol.h"
#include "nbd/server_connection_internal.h"

namespace strata::nbd {

using namespace detail;

aio::Task<bool> ServerConnection::negotiate() {
  std::string greeting;
  WireWriter w(greeting);
  w.u64(kInitMagic);
  w.u64(kOptMagic);
  w.u16(kFlagFixedNewstyle | kFlagNoZeroes);
  iovec iov{greeting.data(), greeting.size()};
  bool sent = co_await transport_.write_all({&iov, 1});
  if (!sent) {
    co_return false;
  }
  char flag_bytes[4];
  bool got = co_await transport_.read_exact(flag_bytes, sizeof(flag_bytes));
  if (!got) {
    co_return false;
  }
  WireReader r(flag_bytes, sizeof(flag_bytes));
  uint32_t client_flags = r.u32();
  fixed_newstyle_ = (client_flags & kClientFixedNewstyle) != 0;
  no_zeroes_ = (client_flags & kClientNoZeroes) != 0;
  if ((client_flags & ~(kClientFixedNewstyle | kClientNoZeroes)) != 0) {
    co_return false;  // QEMU: "Unknown client flags received"
  }
  while (!closing_) {
    char header[16];
    got = co_await transport_.read_exact(header, sizeof(header));
    if (!got) {
      co_return false;
    }
    WireReader h(header, sizeof(header));
    uint64_t magic = h.u64();
    uint32_t option = h.u32();
    uint32_t length = h.u32();
    if (magic != kOptMagic) {
      co_return false;
    }
    if (length > kMaxBufferSize) {
      co_return false;  // QEMU: "len (N) is larger than max len (33554432)"
    }
    if (!fixed_newstyle_ && option != kOptExportName) {
      co_return false;
    }
    OptionResult result = tls_ != nullptr && !tls_transport_
                              ? co_await handle_option_before_tls(option, length)
                              : co_await handle_option(option, length);
    if (result == OptionResult::kClose) {
      co_return false;
    }
    if (result == OptionResult::kSelected) {
      co_return true;
    }
  }
  co_return false;
}

aio::Task<bool> ServerConnection::send_option_reply(uint32_t option, uint32_t type,
                                                    std::string_view data) {
  std::string message;
  WireWriter w(message);
  w.u64(kRepMagic);
  w.u32(option);
  w.u32(type);
  w.u32(static_cast<uint32_t>(data.size()));
  w.bytes(data);
  iovec iov{message.data(), message.size()};
  co_return co_await transport_.write_all({&iov, 1});
}

aio::Task<bool> ServerConnection::send_option_error(uint32_t option, uint32_t type,
                                                    std::string message) {
  if (message.size() >= kMaxStringSize) {
    message.resize(kMaxStringSize - 1);
  }
  co_return co_await send_option_reply(option, type, message);
}

aio::Task<ServerConnection::OptionResult> ServerConnection::handle_option(uint32_t option,
                                                                          uint32_t length) {
  auto reply_ok = [](bool sent) { return sent ? OptionResult::kContinue : OptionResult::kClose; };
  if (option == kOptExportName && length > kMaxStringSize) {
    co_return OptionResult::kClose;  // EXPORT_NAME cannot carry an error reply
  }
  if (length > kMaxOptionRead) {
    bool skipped = co_await transport_.discard(length);
    if (!skipped) {
      co_return OptionResult::kClose;
    }
    bool sent = co_await send_option_error(
        option, kRepErrTooBig,
        "option '" + std::string(option_name(option)) + "' payload is too large");
    co_return reply_ok(sent);
  }
  std::string payload(length, '\0');
  if (length > 0) {
    bool got = co_await transport_.read_exact(payload.data(), length);
    if (!got) {
      co_return OptionResult::kClose;
    }
  }
  auto unexpected_length = [&]() -> std::string {
    return "option '" + std::string(option_name(option)) + "' has unexpected length";
  };

  switch (option) {
    case kOptExportName:
      co_return co_await handle_export_name(payload);
    case kOptAbort: {
      // The client may close without reading the ACK; a failed send changes nothing.
      co_await send_option_reply(option, kRepAck, {});
      co_return OptionResult::kClose;
    }
    case kOptList: {
      if (length != 0) {
        co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, unexpected_length()));
      }
      for (const auto& exp : exports_.list_exports()) {
        std::string data;
        WireWriter w(data);
        w.u32(static_cast<uint32_t>(exp->name().size()));
        w.bytes(exp->name());
        if (exp->config().description) {
          w.bytes(*exp->config().description);
        }
        bool sent = co_await send_option_reply(option, kRepServer, data);
        if (!sent) {
          co_return OptionResult::kClose;
        }
      }
      co_return reply_ok(co_await send_option_reply(option, kRepAck, {}));
    }
    case kOptStartTls:
      if (length != 0) {
        co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, unexpected_length()));
      }
      if (tls_ != nullptr) {
        co_return reply_ok(
            co_await send_option_error(option, kRepErrInvalid, "TLS already enabled"));
      }
      co_return reply_ok(co_await send_option_error(option, kRepErrPolicy, "TLS not configured"));
    case kOptInfo:
    case kOptGo:
      co_return co_await handle_info(option, payload);
    case kOptStructuredReply:
      if (length != 0) {
        co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, unexpected_length()));
      }
      if (mode_ == Mode::kExtended) {
        co_return reply_ok(co_await send_option_error(option, kRepErrExtHeaderReqd,
                                                      "extended headers already negotiated"));
      }
      if (mode_ == Mode::kStructured) {
        co_return reply_ok(co_await send_option_error(option, kRepErrInvalid,
                                                      "structured reply already negotiated"));
      }
      mode_ = Mode::kStructured;
      co_return reply_ok(co_await send_option_reply(option, kRepAck, {}));
    case kOptExtendedHeaders:
      if (length != 0) {
        co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, unexpected_length()));
      }
      if (mode_ == Mode::kExtended) {
        co_return reply_ok(co_await send_option_error(option, kRepErrInvalid,
                                                      "extended headers already negotiated"));
      }
      mode_ = Mode::kExtended;
      co_return reply_ok(co_await send_option_reply(option, kRepAck, {}));
    case kOptListMetaContext:
    case kOptSetMetaContext:
      co_return co_await handle_meta_context(option, payload);
    default:
      co_return reply_ok(co_await send_option_error(
          option, kRepErrUnsup,
          "Unsupported option " + std::to_string(option) + " (" + option_name(option) + ")"));
  }
}

aio::Task<ServerConnection::OptionResult> ServerConnection::handle_export_name(
    const std::string& payload) {
  std::shared_ptr<Export> exp = find_export(payload);
  if (!exp) {
    co_return OptionResult::kClose;  // no way to report an error for EXPORT_NAME
  }
  uint16_t flags = exp->flags();
  if (mode_ != Mode::kSimple) {
    flags |= kFlagSendDf;
  }
  std::string reply;
  WireWriter w(reply);
  w.u64(exp->size());
  w.u16(flags);
  if (!no_zeroes_) {
    reply.append(124, '\0');
  }
  iovec iov{reply.data(), reply.size()};
  bool sent = co_await transport_.write_all({&iov, 1});
  if (!sent) {
    co_return OptionResult::kClose;
  }
  if (contexts_.exp != exp) {
    contexts_ = MetaContexts{};
  }
  export_ = std::move(exp);
  co_return OptionResult::kSelected;
}

aio::Task<ServerConnection::OptionResult> ServerConnection::handle_info(
    uint32_t option, const std::string& payload) {
  auto reply_ok = [](bool sent) { return sent ? OptionResult::kContinue : OptionResult::kClose; };
  // u32 name length, name, u16 request count, u16 requests[].
  WireReader r(payload.data(), payload.size());
  uint32_t name_length = r.u32();
  if (r.failed()) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrInvalid,
        "Inconsistent lengths in option " + std::string(option_name(option))));
  }
  if (name_length > kMaxStringSize) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrInvalid, "Invalid name length: " + std::to_string(name_length)));
  }
  std::string name = r.bytes(name_length);
  uint16_t request_count = r.u16();
  if (r.failed()) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrInvalid,
        "Inconsistent lengths in option " + std::string(option_name(option))));
  }
  // QEMU reads the requests one by one: too few bytes is an inconsistent length, bytes left
  // over an unexpected one.
  if (static_cast<size_t>(request_count) * 2 > r.remaining()) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrInvalid,
        "Inconsistent lengths in option " + std::string(option_name(option))));
  }
  if (static_cast<size_t>(request_count) * 2 != r.remaining()) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrInvalid,
        "option '" + std::string(option_name(option)) + "' has unexpected length"));
  }
  bool send_name = false;
  bool block_size = false;
  for (uint16_t i = 0; i < request_count; ++i) {
    uint16_t info = r.u16();
    send_name |= info == kInfoName;
    block_size |= info == kInfoBlockSize;
  }
  std::shared_ptr<Export> exp = find_export(name);
  if (!exp) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrUnknown, "export '" + sanitize_name(name) + "' not present"));
  }
  if (send_name) {
    std::string data;
    WireWriter w(data);
    w.u16(kInfoName);
    w.bytes(exp->name());
    bool sent = co_await send_option_reply(option, kRepInfo, data);
    if (!sent) {
      co_return OptionResult::kClose;
    }
  }
  if (exp->config().description) {
    std::string data;
    WireWriter w(data);
    w.u16(kInfoDescription);
    w.bytes(*exp->config().description);
    bool sent = co_await send_option_reply(option, kRepInfo, data);
    if (!sent) {
      co_return OptionResult::kClose;
    }
  }
  const block::NodeLimits& limits = exp->node().limits();
  uint32_t alignment = std::max<uint32_t>(limits.request_alignment, 1);
  uint32_t minimum = (option == kOptInfo || block_size) ? alignment : 1;
  uint32_t maximum = kMaxBufferSize;
  if (limits.max_transfer != 0 && limits.max_transfer < maximum) {
    maximum = static_cast<uint32_t>(limits.max_transfer);
  }
  {
    std::string data;
    WireWriter w(data);
    w.u16(kInfoBlockSize);
    w.u32(minimum);
    w.u32(std::max<uint32_t>(4096, minimum));
    w.u32(maximum);
    bool sent = co_await send_option_reply(option, kRepInfo, data);
    if (!sent) {
      co_return OptionResult::kClose;
    }
  }
  uint16_t flags = exp->flags();
  if (mode_ != Mode::kSimple) {
    flags |= kFlagSendDf;
  }
  if (mode_ == Mode::kExtended) {
    flags |= kFlagBlockStatusPayload;
  }
  {
    std::string data;
    WireWriter w(data);
    w.u16(kInfoExport);
    w.u64(exp->size());
    w.u16(flags);
    bool sent = co_await send_option_reply(option, kRepInfo, data);
    if (!sent) {
      co_return OptionResult::kClose;
    }
  }
  if (option == kOptInfo && !block_size && alignment > 1) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrBlockSizeReqd, "request NBD_INFO_BLOCK_SIZE to use this export"));
  }
  bool acked = co_await send_option_reply(option, kRepAck, {});
  if (!acked) {
    co_return OptionResult::kClose;
  }
  if (option == kOptInfo) {
    co_return OptionResult::kContinue;
  }
  if (contexts_.exp != exp) {
    contexts_ = MetaContexts{};
  }
  export_ = std::move(exp);
  co_return OptionResult::kSelected;
}

aio::Task<ServerConnection::OptionResult> ServerConnection::handle_meta_context(
    uint32_t option, const std::string& payload) {
  auto reply_ok = [](bool sent) { return sent ? OptionResult::kContinue : OptionResult::kClose; };
  const bool listing = option == kOptListMetaContext;
  const std::string inconsistent =
      "Inconsistent lengths in option " + std::string(option_name(option));
  // QEMU lists contexts to any client but selects them only for structured-reply clients.
  if (mode_ == Mode::kSimple && !listing) {
    co_return reply_ok(co_await send_option_error(option, kRepErrInvalid,
                                                  "request option '" +
                                                      std::string(option_name(option)) +
                                                      "' when structured reply is not negotiated"));
  }
  if (!listing) {
    contexts_ = MetaContexts{};
  }
  WireReader r(payload.data(), payload.size());
  uint32_t name_length = r.u32();
  if (r.failed()) {
    co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, inconsistent));
  }
  if (name_length > kMaxStringSize) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrInvalid, "Invalid name length: " + std::to_string(name_length)));
  }
  std::string name = r.bytes(name_length);
  if (r.failed()) {
    co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, inconsistent));
  }
  std::shared_ptr<Export> exp = find_export(name);
  if (!exp) {
    co_return reply_ok(co_await send_option_error(
        option, kRepErrUnknown, "export '" + sanitize_name(name) + "' not present"));
  }
  MetaContexts meta;
  meta.exp = exp;
  const auto& bitmap_names = exp->config().bitmaps;
  meta.bitmaps.assign(bitmap_names.size(), false);
  uint32_t query_count = r.u32();
  if (r.failed()) {
    co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, inconsistent));
  }
  if (listing && query_count == 0) {
    meta.base_allocation = true;
    meta.allocation_depth = exp->config().allocation_depth;
    meta.bitmaps.assign(bitmap_names.size(), true);
  }
  for (uint32_t i = 0; i < query_count; ++i) {
    uint32_t query_length = r.u32();
    if (r.failed() || query_length > r.remaining()) {
      co_return reply_ok(co_await send_option_error(option, kRepErrInvalid, inconsistent));
    }
    std::string query = r.bytes(query_length);
    if (query_length > kMaxStringSize) {
      continue;  // QEMU skips over-long queries
    }
    std::string_view q = query;
    if (q.starts_with("base:")) {
      q.remove_prefix(5);
      if ((q.empty() && listing) || q == "allocation") {
        meta.base_allocation = true;
      }
    } else if (q.starts_with("qemu:")) {
      q.remove_prefix(5);
      if (q.empty()) {
        if (listing) {
          meta.allocation_depth = exp->config().allocation_depth;
          meta.bitmaps.assign(bitmap_names.size(), true);
        }
      } else if (q == "allocation-depth") {
        meta.allocation_depth = exp->config().allocation_depth;
      } else if (q.starts_with("dirty-bitmap:")) {
        q.remove_prefix(13);
        for (size_t b = 0; b < bitmap_names.size(); ++b) {
          if ((q.empty() && listing) || q == bitmap_names[b]) {
            meta.bitmaps[b] = true;
          }
        }
      }
    }
  }
  auto send_context = [&](uint32_t id, const std::string& context_name) -> aio::Task<bool> {
    std::string data;
    WireWriter w(data);
    w.u32(listing ? 0 : id);
    w.bytes(context_name);
    co_return co_await send_option_reply(option, kRepMetaContext, data);
  };
  if (meta.base_allocation) {
    bool sent = co_await send_context(kContextBaseAllocation, "base:allocation");
    if (!sent) {
      co_return OptionResult::kClose;
    }
  }
  if (meta.allocation_depth) {
    bool sent = co_await send_context(kContextAllocationDepth, "qemu:allocation-depth");
    if (!sent) {
      co_return OptionResult::kClose;
    }
  }
  for (size_t b = 0; b < meta.bitmaps.size(); ++b) {
    if (meta.bitmaps[b]) {
      bool sent = co_await send_context(kContextFirstBitmap + static_cast<uint32_t>(b),
                                        "qemu:dirty-bitmap:" + bitmap_names[b]);
      if (!sent) {
        co_return OptionResult::kClose;
      }
    }
  }
  if (!listing) {
    contexts_ = std::move(meta);
  }
  co_return reply_ok(co_await send_option_reply(option, kRepAck, {}));
}

}  // namespace strata::nbd
