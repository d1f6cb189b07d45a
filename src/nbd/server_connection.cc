#include "nbd/server_connection.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "block/io/request.h"
#include "nbd/allocation.h"
#include "nbd/protocol.h"

namespace strata::nbd {

namespace {

// Context ids as QEMU numbers them (NBD_META_ID_*); bitmaps follow allocation-depth.
constexpr uint32_t kContextBaseAllocation = 0;
constexpr uint32_t kContextAllocationDepth = 1;
constexpr uint32_t kContextFirstBitmap = 2;

// A name shown in an error message: at most 80 bytes and "..." (QEMU's nbd_sanitize_name), so
// every reply string stays far below the 4096-byte limit.
std::string sanitize_name(std::string_view name) {
  if (name.size() > 80) {
    return std::string(name.substr(0, 80)) + "...";
  }
  return std::string(name);
}

uint32_t error_of(const Error& error) {
  return wire_error(error.has_errno() ? error.errno_value() : EIO);
}

}  // namespace

struct ServerConnection::Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint64_t length = 0;      // the effect length (for BLOCK_STATUS with a payload, from the payload)
  BufferPool::Buffer data;  // WRITE payload, READ destination
  uint64_t buffered = 0;
  std::vector<uint32_t> contexts;  // BLOCK_STATUS: the context ids asked for
};

size_t ServerConnection::MetaContexts::count() const {
  size_t n = (base_allocation ? 1 : 0) + (allocation_depth ? 1 : 0);
  for (bool b : bitmaps) {
    n += b ? 1 : 0;
  }
  return n;
}

ServerConnection::ServerConnection(Transport& transport, const ExportDirectory& exports)
    : transport_(transport), exports_(exports) {}

ServerConnection::~ServerConnection() {
  if (registered_) {
    export_->remove_connection(*this);
  }
}

void ServerConnection::close() {
  closing_ = true;
  transport_.shutdown();
  slot_free_.set();
}

aio::Task<void> ServerConnection::run() {
  bool selected = co_await negotiate();
  if (!selected || closing_) {
    co_return;
  }
  co_await transmission();
  // Requests still running hold references into this object; the transport stays open until
  // they have sent (or failed to send) their replies.
  co_await requests_.wait();
  if (registered_) {
    registered_ = false;
    export_->remove_connection(*this);
  }
}

std::shared_ptr<Export> ServerConnection::find_export(std::string_view name) const {
  auto exp = exports_.find_export(name);
  if (exp && exp->shutting_down()) {
    return nullptr;
  }
  return exp;
}

// ---- handshake -------------------------------------------------------------------------------

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
    OptionResult result = co_await handle_option(option, length);
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

// ---- transmission ----------------------------------------------------------------------------

aio::Task<void> ServerConnection::transmission() {
  if (export_->shutting_down()) {
    co_return;
  }
  export_->add_connection(*this);
  registered_ = true;
  const bool extended = mode_ == Mode::kExtended;
  const bool writable = export_->config().writable;
  while (!closing_) {
    while (!closing_ && (in_flight_ >= kMaxRequests || in_flight_bytes_ > kMaxBufferedBytes)) {
      slot_free_.reset();
      co_await slot_free_.wait();
    }
    if (closing_) {
      break;
    }
    char header[kExtendedRequestSize];
    const size_t header_size = extended ? kExtendedRequestSize : kRequestSize;
    bool got = co_await transport_.read_exact(header, header_size);
    if (!got) {
      break;
    }
    WireReader h(header, header_size);
    auto request = std::make_unique<Request>();
    uint32_t magic = h.u32();
    request->flags = h.u16();
    request->type = h.u16();
    request->cookie = h.u64();
    request->offset = h.u64();
    request->length = extended ? h.u64() : h.u32();
    if (magic != (extended ? kExtendedRequestMagic : kRequestMagic)) {
      break;  // QEMU: "invalid magic" ends the connection
    }
    const uint16_t type = request->type;
    if (type == kCmdDisc) {
      break;  // finish what is in flight, then close
    }

    // Payload handling first: whatever the verdict, the stream must stay in sync.
    std::string problem;
    uint32_t problem_error = kEinval;
    bool fatal = false;
    const bool payload_flag = (request->flags & kCmdFlagPayloadLen) != 0;
    if (type == kCmdRead || type == kCmdWrite || type == kCmdCache) {
      if (request->length > kMaxBufferSize) {
        problem = "len (" + std::to_string(request->length) + ") is larger than max len (" +
                  std::to_string(kMaxBufferSize) + ")";
        fatal = type == kCmdWrite;  // the payload was not read: the stream is lost
      }
    }
    if (problem.empty() && type == kCmdWrite) {
      request->data = buffers_.acquire(request->length);
      if (!request->data) {
        problem = "No memory";
        problem_error = kEnomem;
        fatal = true;
      } else if (request->length > 0) {
        got = co_await transport_.read_exact(request->data.get(), request->length);
        if (!got) {
          break;
        }
      }
      request->buffered = request->length;
    } else if (type == kCmdBlockStatus && extended && payload_flag) {
      // u64 effect length, u32 context ids[].
      uint64_t payload_length = request->length;
      if (payload_length > 8 + 4ull * (contexts_.count() + 64)) {
        problem = "payload of block status request is too long";
        if (payload_length > kMaxOptionRead) {
          fatal = true;
        } else {
          bool skipped = co_await transport_.discard(payload_length);
          if (!skipped) {
            break;
          }
        }
      } else {
        std::string payload(payload_length, '\0');
        if (payload_length > 0) {
          got = co_await transport_.read_exact(payload.data(), payload_length);
          if (!got) {
            break;
          }
        }
        if (payload_length < 12 || (payload_length - 8) % 4 != 0) {
          problem = "invalid block status payload";
        } else {
          WireReader p(payload.data(), payload.size());
          request->length = p.u64();
          while (p.remaining() >= 4) {
            request->contexts.push_back(p.u32());
          }
        }
      }
    } else if (payload_flag && extended && type != kCmdWrite) {
      problem = "unexpected payload for command " + std::string(command_name(type));
      fatal = true;
    }

    if (problem.empty()) {
      uint16_t valid = kCmdFlagFua;
      if (type == kCmdRead && mode_ != Mode::kSimple) {
        valid |= kCmdFlagDf;
      } else if (type == kCmdWriteZeroes) {
        valid |= kCmdFlagNoHole | kCmdFlagFastZero;
      } else if (type == kCmdBlockStatus) {
        valid |= kCmdFlagReqOne;
      }
      if (extended && (type == kCmdWrite || type == kCmdBlockStatus)) {
        valid |= kCmdFlagPayloadLen;
      }
      if ((request->flags & ~valid) != 0) {
        problem = "unsupported flags for command " + std::string(command_name(type)) + " (got 0x" +
                  [](uint16_t v) {
                    char text[8];
                    std::snprintf(text, sizeof(text), "%x", v);
                    return std::string(text);
                  }(request->flags) +
                  ")";
      }
    }
    if (problem.empty()) {
      switch (type) {
        case kCmdRead:
        case kCmdWrite:
        case kCmdFlush:
        case kCmdTrim:
        case kCmdCache:
        case kCmdWriteZeroes:
        case kCmdBlockStatus:
          break;
        default:
          problem = "invalid request type (" + std::to_string(type) + ") received";
          break;
      }
    }
    if (problem.empty() && !writable &&
        (type == kCmdWrite || type == kCmdTrim || type == kCmdWriteZeroes)) {
      problem = "Export is read-only";
      problem_error = kEperm;
    }
    if (problem.empty() && type != kCmdFlush) {
      const uint64_t size = export_->size();
      if (request->offset > size || request->length > size - request->offset) {
        problem = "operation past EOF; From: " + std::to_string(request->offset) +
                  ", Len: " + std::to_string(request->length) + ", Size: " + std::to_string(size);
      }
    }
    if (problem.empty() && type == kCmdBlockStatus) {
      if (mode_ == Mode::kSimple || contexts_.count() == 0) {
        problem = "CMD_BLOCK_STATUS not negotiated";
      } else if (request->length == 0) {
        problem = "need non-zero length";
      } else {
        for (uint32_t id : request->contexts) {
          bool known =
              (id == kContextBaseAllocation && contexts_.base_allocation) ||
              (id == kContextAllocationDepth && contexts_.allocation_depth) ||
              (id >= kContextFirstBitmap && id - kContextFirstBitmap < contexts_.bitmaps.size() &&
               contexts_.bitmaps[id - kContextFirstBitmap]);
          if (!known) {
            problem = "Invalid context id " + std::to_string(id);
            break;
          }
        }
      }
    }
    if (!problem.empty()) {
      co_await send_error(*request, problem_error, problem);
      if (fatal) {
        break;
      }
      continue;
    }
    ++in_flight_;
    in_flight_bytes_ +=
        std::max<uint64_t>(request->buffered, type == kCmdRead ? request->length : 0);
    requests_.spawn(handle_request(std::move(request)));
  }
}

aio::Task<void> ServerConnection::handle_request(std::unique_ptr<Request> request) {
  // Let the reader take the next request before this one starts its I/O.
  const uint64_t held =
      std::max<uint64_t>(request->buffered, request->type == kCmdRead ? request->length : 0);
  block::Node& node = export_->node();
  const bool fua = (request->flags & kCmdFlagFua) != 0 || export_->config().writethrough;
  switch (request->type) {
    case kCmdRead:
      co_await do_read(*request);
      break;
    case kCmdWrite: {
      Result<void> result =
          co_await block::io::pwrite(node, request->offset, request->data.get(), request->length,
                                     fua ? uint32_t{block::kRequestFua} : 0u);
      co_await send_result(*request, result);
      break;
    }
    case kCmdFlush: {
      Result<void> result = co_await block::io::flush(node);
      co_await send_result(*request, result);
      break;
    }
    case kCmdTrim: {
      Result<void> result = co_await block::io::pdiscard(node, request->offset, request->length);
      if (result && fua) {
        result = co_await block::io::flush(node);
      }
      co_await send_result(*request, result);
      break;
    }
    case kCmdWriteZeroes: {
      uint32_t flags = fua ? uint32_t{block::kRequestFua} : 0u;
      if ((request->flags & kCmdFlagNoHole) == 0) {
        flags |= block::kRequestMayUnmap;
      }
      if ((request->flags & kCmdFlagFastZero) != 0) {
        flags |= block::kRequestNoFallback;
      }
      Result<void> result =
          co_await block::io::pwrite_zeroes(node, request->offset, request->length, flags);
      co_await send_result(*request, result);
      break;
    }
    case kCmdCache:
      // Advisory: the request was validated; strata keeps no cache to populate.
      co_await send_simple(*request, 0);
      break;
    case kCmdBlockStatus:
      co_await do_block_status(*request);
      break;
    default:
      co_await send_error(*request, kEinval, "invalid request type");
      break;
  }
  --in_flight_;
  in_flight_bytes_ -= held;
  slot_free_.set();
}

// ---- replies ---------------------------------------------------------------------------------

aio::Task<void> ServerConnection::send_iov(std::vector<iovec> iov) {
  auto guard = co_await send_lock_.scoped_lock();
  if (closing_) {
    co_return;
  }
  bool sent = co_await transport_.write_all(iov);
  if (!sent) {
    close();
  }
}

std::string ServerConnection::chunk_header(const Request& request, uint16_t flags, uint16_t type,
                                           uint64_t length) const {
  std::string header;
  WireWriter w(header);
  if (mode_ == Mode::kExtended) {
    w.u32(kExtendedReplyMagic);
    w.u16(flags);
    w.u16(type);
    w.u64(request.cookie);
    w.u64(request.offset);
    w.u64(length);
  } else {
    w.u32(kStructuredReplyMagic);
    w.u16(flags);
    w.u16(type);
    w.u64(request.cookie);
    w.u32(static_cast<uint32_t>(length));
  }
  return header;
}

aio::Task<void> ServerConnection::send_simple(const Request& request, uint32_t error) {
  std::string reply;
  if (mode_ == Mode::kExtended) {
    reply = chunk_header(request, kReplyFlagDone, kChunkNone, 0);
  } else {
    WireWriter w(reply);
    w.u32(kSimpleReplyMagic);
    w.u32(error);
    w.u64(request.cookie);
  }
  std::vector<iovec> iov{iovec{reply.data(), reply.size()}};
  co_await send_iov(std::move(iov));
}

aio::Task<void> ServerConnection::send_error(const Request& request, uint32_t error,
                                             const std::string& message) {
  if (mode_ == Mode::kSimple) {
    co_await send_simple(request, error);
    co_return;
  }
  std::string text = message.substr(0, kMaxStringSize - 1);
  std::string payload;
  WireWriter p(payload);
  p.u32(error);
  p.u16(static_cast<uint16_t>(text.size()));
  p.bytes(text);
  std::string reply = chunk_header(request, kReplyFlagDone, kChunkError, payload.size());
  reply += payload;
  std::vector<iovec> iov{iovec{reply.data(), reply.size()}};
  co_await send_iov(std::move(iov));
}

aio::Task<void> ServerConnection::send_result(const Request& request, const Result<void>& result) {
  if (result) {
    co_await send_simple(request, 0);
  } else {
    co_await send_error(request, error_of(result.error()), result.error().message());
  }
}

aio::Task<void> ServerConnection::do_read(Request& request) {
  block::Node& node = export_->node();
  const uint64_t length = request.length;
  request.data = buffers_.acquire(length);
  if (!request.data) {
    co_await send_error(request, kEnomem, "No memory");
    co_return;
  }
  char* buffer = request.data.get();
  const bool sparse = mode_ != Mode::kSimple && (request.flags & kCmdFlagDf) == 0;

  // Runs of [start, end) that are holes (sparse replies only); data between them is read.
  struct Run {
    uint64_t start;
    uint64_t length;
    bool hole;
  };
  std::vector<Run> runs;
  uint64_t done = 0;
  while (done < length) {
    uint64_t run_length = length - done;
    bool hole = false;
    if (sparse && !export_->data_hint_covers(request.offset + done, length - done)) {
      // Asks up to the end of the export: a long data run becomes the hint for later reads.
      const uint64_t position = request.offset + done;
      Result<AllocationRun> status =
          co_await allocation_status(node, position, export_->size() - position);
      if (!status) {
        co_await send_error(request, error_of(status.error()), status.error().message());
        co_return;
      }
      run_length = std::min(status->bytes, length - done);
      hole = status->zero;
      if (!hole) {
        export_->set_data_hint(request.offset + done, request.offset + done + status->bytes);
      }
    }
    if (!runs.empty() && runs.back().hole == hole) {
      runs.back().length += run_length;
    } else {
      runs.push_back(Run{done, run_length, hole});
    }
    done += run_length;
  }
  for (const Run& run : runs) {
    if (run.hole) {
      continue;
    }
    Result<void> read =
        co_await block::io::pread(node, request.offset + run.start, buffer + run.start, run.length);
    if (!read) {
      co_await send_error(request, error_of(read.error()), read.error().message());
      co_return;
    }
  }

  if (mode_ == Mode::kSimple) {
    std::string header;
    WireWriter w(header);
    w.u32(kSimpleReplyMagic);
    w.u32(0);
    w.u64(request.cookie);
    std::vector<iovec> iov{iovec{header.data(), header.size()}, iovec{buffer, length}};
    co_await send_iov(std::move(iov));
    co_return;
  }
  if (runs.empty()) {
    // A zero-length read: one empty final chunk.
    std::string reply = chunk_header(request, kReplyFlagDone, kChunkNone, 0);
    std::vector<iovec> iov{iovec{reply.data(), reply.size()}};
    co_await send_iov(std::move(iov));
    co_return;
  }
  // One header string per chunk; iovecs point into `headers` (reserved, so never reallocated).
  std::vector<std::string> headers;
  headers.reserve(runs.size());
  std::vector<iovec> iov;
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    const uint16_t flags = i + 1 == runs.size() ? kReplyFlagDone : 0;
    std::string payload;
    WireWriter p(payload);
    p.u64(request.offset + run.start);
    if (run.hole) {
      p.u32(static_cast<uint32_t>(run.length));
      headers.push_back(chunk_header(request, flags, kChunkOffsetHole, payload.size()) + payload);
      iov.push_back(iovec{headers.back().data(), headers.back().size()});
    } else {
      headers.push_back(chunk_header(request, flags, kChunkOffsetData, 8 + run.length) + payload);
      iov.push_back(iovec{headers.back().data(), headers.back().size()});
      iov.push_back(iovec{buffer + run.start, run.length});
    }
  }
  co_await send_iov(std::move(iov));
}

aio::Task<Result<void>> ServerConnection::collect_extents(
    uint32_t context, uint64_t offset, uint64_t length, uint32_t max_extents,
    std::vector<std::pair<uint64_t, uint64_t>>& out) {
  block::Node& node = export_->node();
  uint64_t done = 0;
  while (done < length) {
    uint64_t run_length = length - done;
    uint64_t flags = 0;
    if (context == kContextBaseAllocation || context == kContextAllocationDepth) {
      Result<AllocationRun> status = co_await allocation_status(node, offset + done, length - done);
      if (!status) {
        co_return std::move(status).error();
      }
      run_length = std::min(status->bytes, length - done);
      if (context == kContextBaseAllocation) {
        flags = (status->data ? 0 : kStateHole) | (status->zero ? kStateZero : 0);
      } else {
        flags = status->depth;
      }
    }
    // Dirty bitmaps: no bitmap source exists yet, so every range is clean (flags 0).
    if (!out.empty() && out.back().second == flags) {
      out.back().first += run_length;
    } else {
      if (out.size() >= max_extents) {
        break;
      }
      out.emplace_back(run_length, flags);
    }
    done += run_length;
  }
  co_return ok();
}

aio::Task<void> ServerConnection::do_block_status(Request& request) {
  std::vector<uint32_t> ids = request.contexts;
  if (ids.empty()) {
    if (contexts_.base_allocation) {
      ids.push_back(kContextBaseAllocation);
    }
    if (contexts_.allocation_depth) {
      ids.push_back(kContextAllocationDepth);
    }
    for (size_t b = 0; b < contexts_.bitmaps.size(); ++b) {
      if (contexts_.bitmaps[b]) {
        ids.push_back(kContextFirstBitmap + static_cast<uint32_t>(b));
      }
    }
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  const bool one = (request.flags & kCmdFlagReqOne) != 0;
  const uint32_t max_extents = one ? 1 : kMaxBlockStatusExtents;
  const bool extended = mode_ == Mode::kExtended;
  // Non-extended extents carry 32-bit lengths: cap the queried range (the request's length is
  // 32-bit there anyway).
  std::vector<std::string> chunks;
  for (uint32_t id : ids) {
    std::vector<std::pair<uint64_t, uint64_t>> extents;
    Result<void> collected =
        co_await collect_extents(id, request.offset, request.length, max_extents, extents);
    if (!collected) {
      co_await send_error(request, error_of(collected.error()), collected.error().message());
      co_return;
    }
    std::string payload;
    WireWriter p(payload);
    p.u32(id);
    if (extended) {
      p.u32(static_cast<uint32_t>(extents.size()));
      for (const auto& [len, flags] : extents) {
        p.u64(len);
        p.u64(flags);
      }
    } else {
      for (const auto& [len, flags] : extents) {
        p.u32(static_cast<uint32_t>(len));
        p.u32(static_cast<uint32_t>(flags));
      }
    }
    chunks.push_back(std::move(payload));
  }
  std::vector<std::string> messages;
  messages.reserve(chunks.size());
  std::vector<iovec> iov;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const uint16_t flags = i + 1 == chunks.size() ? kReplyFlagDone : 0;
    messages.push_back(chunk_header(request, flags,
                                    extended ? kChunkBlockStatusExt : kChunkBlockStatus,
                                    chunks[i].size()) +
                       chunks[i]);
    iov.push_back(iovec{messages.back().data(), messages.back().size()});
  }
  co_await send_iov(std::move(iov));
}

}  // namespace strata::nbd
