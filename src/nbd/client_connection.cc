#include "nbd/client_connection.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "nbd/protocol.h"

namespace strata::nbd {

namespace {

Error request_error(int error, const std::string& message) {
  return Error(ErrorKind::kIo, message, error);
}

}  // namespace

int host_errno(uint32_t wire_error) {
  switch (wire_error) {
    case kEperm:
      return EPERM;
    case kEio:
      return EIO;
    case kEnomem:
      return ENOMEM;
    case kEnospc:
      return ENOSPC;
    case kEoverflow:
      return EOVERFLOW;
    case kEnotsup:
      return ENOTSUP;
    case kEshutdown:
      return ESHUTDOWN;
    case kEinval:
    default:
      return EINVAL;
  }
}

// One request waiting for its reply. Lives in the requester's frame.
struct ClientConnection::Pending {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  block::IoVector destination;                         // READ
  std::vector<std::pair<uint64_t, uint64_t>> covered;  // READ: [offset, end) of data/hole chunks
  std::optional<BlockStatusExtent> extent;             // BLOCK_STATUS
  std::optional<Error> error;                          // the first error the server reported
  bool finished = false;
  aio::Event done;
};

// Registers a Pending under a fresh cookie and takes an in-flight slot; undoes both when the
// requester leaves, even if its frame is destroyed while waiting.
class ClientConnection::PendingGuard {
 public:
  PendingGuard(ClientConnection& connection, Pending& pending)
      : connection_(connection), pending_(pending) {
    pending.cookie = connection.next_cookie_++;
    connection.pending_[pending.cookie] = &pending;
    ++connection.unfinished_;
  }
  ~PendingGuard() {
    if (!pending_.finished) {
      --connection_.unfinished_;
    }
    connection_.pending_.erase(pending_.cookie);
    --connection_.in_flight_;
    connection_.slot_waiters_.notify_one();
  }
  PendingGuard(const PendingGuard&) = delete;
  PendingGuard& operator=(const PendingGuard&) = delete;

 private:
  ClientConnection& connection_;
  Pending& pending_;
};

ClientConnection::ClientConnection(Transport& transport, const ExportInfo& info)
    : transport_(&transport), info_(info) {}

ClientConnection::~ClientConnection() = default;

void ClientConnection::rebind(Transport& transport) {
  transport_ = &transport;
}

ClientConnection::Pending* ClientConnection::find(uint64_t cookie) {
  auto it = pending_.find(cookie);
  if (it == pending_.end() || it->second->finished) {
    return nullptr;
  }
  return it->second;
}

void ClientConnection::shutdown() {
  if (!broken_) {
    fail_all("the connection was shut down");
  }
}

void ClientConnection::fail_all(const std::string& reason) {
  if (broken_) {
    return;
  }
  broken_ = true;
  failure_ = reason;
  transport_->shutdown();
  for (auto& [cookie, pending] : pending_) {
    if (!pending->finished) {
      pending->finished = true;
      --unfinished_;
      pending->error = request_error(EIO, reason);
      pending->done.set();
    }
  }
  slot_waiters_.notify_all();
}

aio::Task<void> ClientConnection::disconnect() {
  if (!broken_) {
    std::string header = request_header(0, kCmdDisc, next_cookie_++, 0, 0);
    {
      auto guard = co_await send_lock_.scoped_lock();
      iovec iov{header.data(), header.size()};
      bool sent = co_await transport_->write_all(std::span<const iovec>(&iov, 1));
      (void)sent;  // the server may already be gone; the connection ends either way
    }
    fail_all("the client disconnected");
  }
}

std::string ClientConnection::request_header(uint16_t flags, uint16_t type, uint64_t cookie,
                                             uint64_t offset, uint64_t length) const {
  std::string header;
  WireWriter w(header);
  w.u32(info_.extended_headers ? kExtendedRequestMagic : kRequestMagic);
  w.u16(flags);
  w.u16(type);
  w.u64(cookie);
  w.u64(offset);
  if (info_.extended_headers) {
    w.u64(length);
  } else {
    w.u32(static_cast<uint32_t>(length));
  }
  return header;
}

aio::Task<Result<void>> ClientConnection::submit(Pending& pending, const block::IoVector* payload) {
  std::string header =
      request_header(pending.flags, pending.type, pending.cookie, pending.offset, pending.length);
  std::vector<iovec> iov;
  iov.push_back(iovec{header.data(), header.size()});
  if (payload != nullptr) {
    for (const iovec& v : payload->entries()) {
      iov.push_back(v);
    }
  }
  auto guard = co_await send_lock_.scoped_lock();
  if (broken_) {
    co_return request_error(EIO, failure_);
  }
  bool sent = co_await transport_->write_all(iov);
  if (!sent) {
    fail_all("failed to send a request to the NBD server");
    co_return request_error(EIO, failure_);
  }
  co_return ok();
}

// The shared request path: takes a slot, sends, waits for the reader to finish the reply.
aio::Task<Result<void>> ClientConnection::run_request(Pending& pending,
                                                      const block::IoVector* payload) {
  while (in_flight_ >= kMaxInFlight && !broken_) {
    co_await slot_waiters_.wait();
  }
  if (broken_) {
    co_return request_error(EIO, failure_);
  }
  ++in_flight_;
  PendingGuard registration(*this, pending);
  auto sent = co_await submit(pending, payload);
  if (!sent) {
    co_return sent;
  }
  if (!reader_running_ && !broken_) {
    reader_running_ = true;
    readers_.spawn(run_reader());
  }
  co_await pending.done.wait();
  if (pending.error) {
    co_return *pending.error;
  }
  co_return ok();
}

aio::Task<Result<void>> ClientConnection::read(uint64_t offset, block::IoVector qiov) {
  Pending pending;
  pending.type = kCmdRead;
  pending.offset = offset;
  pending.length = static_cast<uint32_t>(qiov.size());
  pending.destination = qiov;
  auto done = co_await run_request(pending, nullptr);
  co_return done;
}

aio::Task<Result<void>> ClientConnection::write(uint64_t offset, block::IoVector data,
                                                uint16_t flags) {
  Pending pending;
  pending.type = kCmdWrite;
  pending.flags = flags;
  pending.offset = offset;
  pending.length = static_cast<uint32_t>(data.size());
  auto done = co_await run_request(pending, &data);
  co_return done;
}

aio::Task<Result<void>> ClientConnection::command(uint16_t type, uint16_t flags, uint64_t offset,
                                                  uint32_t length) {
  Pending pending;
  pending.type = type;
  pending.flags = flags;
  pending.offset = offset;
  pending.length = length;
  auto done = co_await run_request(pending, nullptr);
  co_return done;
}

aio::Task<Result<BlockStatusExtent>> ClientConnection::block_status(uint64_t offset,
                                                                    uint32_t length) {
  Pending pending;
  pending.type = kCmdBlockStatus;
  pending.flags = kCmdFlagReqOne;
  pending.offset = offset;
  pending.length = length;
  auto done = co_await run_request(pending, nullptr);
  if (!done) {
    co_return std::move(done).error();
  }
  co_return *pending.extent;
}

void ClientConnection::complete(Pending& pending) {
  pending.finished = true;
  --unfinished_;
  if (!pending.error && pending.type == kCmdRead && info_.structured_replies) {
    // Data and hole chunks must cover the request exactly once (proto.md: chunks MUST NOT
    // overlap, and a successful read covers the whole request).
    std::sort(pending.covered.begin(), pending.covered.end());
    uint64_t expected = pending.offset;
    for (const auto& [begin, end] : pending.covered) {
      if (begin != expected) {
        break;
      }
      expected = end;
    }
    if (expected != pending.offset + pending.length) {
      pending.error = request_error(
          EIO, "Protocol error: server's read reply does not cover the request exactly once");
    }
  }
  if (!pending.error && pending.type == kCmdBlockStatus && !pending.extent) {
    pending.error =
        request_error(EIO, "Protocol error: server did not reply with any block status");
  }
  pending.done.set();
}

aio::Task<void> ClientConnection::run_reader() {
  // Lets requests issued in the same loop iteration register first, so one reader pass serves
  // them all.
  co_await aio::EventLoop::current()->yield();
  while (!broken_ && unfinished_ > 0) {
    auto result = co_await read_reply();
    if (!result) {
      if (!broken_) {
        std::fprintf(stderr, "NBD client: %s\n", result.error().message().c_str());
      }
      fail_all(result.error().message());
    }
  }
  reader_running_ = false;
}

aio::Task<Result<void>> ClientConnection::read_reply() {
  char magic_bytes[4];
  bool got = co_await transport_->read_exact(magic_bytes, sizeof(magic_bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(magic_bytes, sizeof(magic_bytes));
  uint32_t magic = reader.u32();
  if (info_.extended_headers) {
    // With extended headers every reply is an extended chunk (proto.md).
    if (magic == kExtendedReplyMagic) {
      auto done = co_await read_extended_chunk();
      co_return done;
    }
  } else if (magic == kSimpleReplyMagic) {
    auto done = co_await read_simple_reply();
    co_return done;
  } else if (magic == kStructuredReplyMagic && info_.structured_replies) {
    auto done = co_await read_structured_chunk();
    co_return done;
  }
  char text[64];
  std::snprintf(text, sizeof(text), "Protocol error: invalid reply magic 0x%08x", magic);
  co_return request_error(EIO, text);
}

aio::Task<Result<void>> ClientConnection::read_simple_reply() {
  char bytes[12];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(bytes, sizeof(bytes));
  uint32_t error = reader.u32();
  uint64_t cookie = reader.u64();
  Pending* pending = find(cookie);
  if (pending == nullptr) {
    co_return request_error(
        EIO, "Protocol error: server sent a reply for unknown cookie " + std::to_string(cookie));
  }
  if (error != 0) {
    pending->error = request_error(host_errno(error), std::string("server failed the request: ") +
                                                          std::strerror(host_errno(error)));
  } else if (pending->type == kCmdRead) {
    if (info_.structured_replies) {
      co_return request_error(
          EIO, "Protocol error: server sent a simple reply without error to a structured read");
    }
    for (const iovec& v : pending->destination.entries()) {
      got = co_await transport_->read_exact(v.iov_base, v.iov_len);
      if (!got) {
        co_return request_error(EIO, "the NBD server closed the connection");
      }
    }
  } else if (pending->type == kCmdBlockStatus) {
    co_return request_error(EIO, "Protocol error: server sent a simple reply to block status");
  }
  complete(*pending);
  co_return ok();
}

aio::Task<Result<void>> ClientConnection::read_structured_chunk() {
  char bytes[16];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(bytes, sizeof(bytes));
  uint16_t flags = reader.u16();
  uint16_t type = reader.u16();
  uint64_t cookie = reader.u64();
  uint32_t length = reader.u32();
  Pending* pending = find(cookie);
  if (pending == nullptr) {
    co_return request_error(EIO, "Protocol error: server sent a reply chunk for unknown cookie " +
                                     std::to_string(cookie));
  }
  auto done = co_await read_chunk(*pending, flags, type, length);
  co_return done;
}

aio::Task<Result<void>> ClientConnection::read_extended_chunk() {
  char bytes[28];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(bytes, sizeof(bytes));
  uint16_t flags = reader.u16();
  uint16_t type = reader.u16();
  uint64_t cookie = reader.u64();
  (void)reader.u64();  // the request's offset, echoed
  uint64_t length = reader.u64();
  Pending* pending = find(cookie);
  if (pending == nullptr) {
    co_return request_error(EIO, "Protocol error: server sent a reply chunk for unknown cookie " +
                                     std::to_string(cookie));
  }
  // No chunk is larger than the request's data plus its own overhead; nothing larger is read.
  if (length > uint64_t{kMaxBufferSize} + kMaxChunkOverhead) {
    co_return request_error(EIO, "Protocol error: invalid payload length " +
                                     std::to_string(length) + " for an extended reply chunk");
  }
  auto done = co_await read_chunk(*pending, flags, type, static_cast<uint32_t>(length));
  co_return done;
}

aio::Task<Result<void>> ClientConnection::read_chunk(Pending& pending_ref, uint16_t flags,
                                                     uint16_t type, uint32_t length) {
  Pending* pending = &pending_ref;
  Result<void> handled = ok();
  switch (type) {
    case kChunkNone:
      if ((flags & kReplyFlagDone) == 0 || length != 0) {
        co_return request_error(
            EIO,
            "Protocol error: NBD_REPLY_TYPE_NONE chunk without the done flag or with a "
            "payload");
      }
      break;
    case kChunkOffsetData:
      handled = co_await read_data_chunk(*pending, length);
      break;
    case kChunkOffsetHole:
      handled = co_await read_hole_chunk(*pending, length);
      break;
    case kChunkBlockStatus:
      if (info_.extended_headers) {
        co_return request_error(EIO,
                                "Protocol error: server sent NBD_REPLY_TYPE_BLOCK_STATUS with "
                                "extended headers");
      }
      handled = co_await read_block_status_chunk(*pending, length);
      break;
    case kChunkBlockStatusExt:
      if (!info_.extended_headers) {
        co_return request_error(
            EIO, "Protocol error: unexpected reply chunk type " + std::to_string(type));
      }
      handled = co_await read_block_status_ext_chunk(*pending, length);
      break;
    default:
      if ((type & (1u << 15)) == 0) {
        co_return request_error(
            EIO, "Protocol error: unexpected reply chunk type " + std::to_string(type));
      }
      handled = co_await read_error_chunk(*pending, type, length);
      break;
  }
  if (!handled) {
    co_return handled;
  }
  if ((flags & kReplyFlagDone) != 0) {
    complete(*pending);
  }
  co_return ok();
}

aio::Task<Result<void>> ClientConnection::read_data_chunk(Pending& pending, uint32_t length) {
  if (pending.type != kCmdRead) {
    co_return request_error(EIO, "Protocol error: server sent a data chunk to a " +
                                     std::string(command_name(pending.type)) + " request");
  }
  if (length <= 8 || length - 8 > pending.length) {
    co_return request_error(EIO, "Protocol error: invalid payload length " +
                                     std::to_string(length) + " for NBD_REPLY_TYPE_OFFSET_DATA");
  }
  char bytes[8];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  uint64_t offset = WireReader(bytes, sizeof(bytes)).u64();
  uint64_t data_length = length - 8;
  if (offset < pending.offset || offset - pending.offset > pending.length - data_length) {
    co_return request_error(EIO, "Protocol error: server sent chunk exceeding requested region");
  }
  block::IoVector part = pending.destination.slice(offset - pending.offset, data_length);
  for (const iovec& v : part.entries()) {
    got = co_await transport_->read_exact(v.iov_base, v.iov_len);
    if (!got) {
      co_return request_error(EIO, "the NBD server closed the connection");
    }
  }
  pending.covered.emplace_back(offset, offset + data_length);
  co_return ok();
}

aio::Task<Result<void>> ClientConnection::read_hole_chunk(Pending& pending, uint32_t length) {
  if (pending.type != kCmdRead) {
    co_return request_error(EIO, "Protocol error: server sent a hole chunk to a " +
                                     std::string(command_name(pending.type)) + " request");
  }
  if (length != 12) {
    co_return request_error(EIO, "Protocol error: invalid payload length " +
                                     std::to_string(length) + " for NBD_REPLY_TYPE_OFFSET_HOLE");
  }
  char bytes[12];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(bytes, sizeof(bytes));
  uint64_t offset = reader.u64();
  uint32_t hole = reader.u32();
  if (hole == 0 || hole > pending.length || offset < pending.offset ||
      offset - pending.offset > pending.length - hole) {
    co_return request_error(EIO, "Protocol error: server sent chunk exceeding requested region");
  }
  pending.destination.fill(offset - pending.offset, 0, hole);
  pending.covered.emplace_back(offset, offset + hole);
  co_return ok();
}

Result<void> ClientConnection::check_block_status_chunk(const Pending& pending) const {
  if (pending.type != kCmdBlockStatus) {
    return request_error(EIO, "Protocol error: server sent a block status chunk to a " +
                                  std::string(command_name(pending.type)) + " request");
  }
  if (pending.extent) {
    return request_error(EIO,
                         "Protocol error: server sent several block status chunks for the "
                         "same context");
  }
  return ok();
}

aio::Task<Result<void>> ClientConnection::take_extent(Pending& pending, uint32_t context,
                                                      uint64_t length, uint32_t flags,
                                                      uint64_t rest) {
  if (!info_.has_meta_context || context != info_.meta_context_id) {
    co_return request_error(EIO, "Protocol error: server sent block status for context id " +
                                     std::to_string(context) + ", which was not negotiated");
  }
  if (length == 0) {
    co_return request_error(EIO, "Protocol error: server sent an extent of zero length");
  }
  // With NBD_CMD_FLAG_REQ_ONE the server may still send an extent longer than asked (proto.md
  // allows it for the last extent); only the requested part counts. Further extents are
  // dropped.
  BlockStatusExtent extent;
  extent.length = std::min<uint64_t>(length, pending.length);
  extent.flags = flags;
  bool got = co_await transport_->discard(rest);
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  pending.extent = extent;
  co_return ok();
}

aio::Task<Result<void>> ClientConnection::read_block_status_chunk(Pending& pending,
                                                                  uint32_t length) {
  Result<void> acceptable = check_block_status_chunk(pending);
  if (!acceptable) {
    co_return acceptable;
  }
  if (length < 12 || (length - 4) % 8 != 0 || length > 4 + 8 * kMaxBlockStatusExtents) {
    co_return request_error(EIO, "Protocol error: invalid payload length " +
                                     std::to_string(length) + " for NBD_REPLY_TYPE_BLOCK_STATUS");
  }
  char bytes[12];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(bytes, sizeof(bytes));
  uint32_t context = reader.u32();
  uint32_t extent_length = reader.u32();
  uint32_t flags = reader.u32();
  auto taken = co_await take_extent(pending, context, extent_length, flags, length - 12);
  co_return taken;
}

aio::Task<Result<void>> ClientConnection::read_block_status_ext_chunk(Pending& pending,
                                                                      uint32_t length) {
  Result<void> acceptable = check_block_status_chunk(pending);
  if (!acceptable) {
    co_return acceptable;
  }
  if (length < 24 || (length - 8) % 16 != 0 || length > 8 + 16 * kMaxBlockStatusExtents) {
    co_return request_error(EIO, "Protocol error: invalid payload length " +
                                     std::to_string(length) +
                                     " for NBD_REPLY_TYPE_BLOCK_STATUS_EXT");
  }
  char bytes[24];
  bool got = co_await transport_->read_exact(bytes, sizeof(bytes));
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(bytes, sizeof(bytes));
  uint32_t context = reader.u32();
  uint32_t count = reader.u32();
  uint64_t extent_length = reader.u64();
  uint64_t flags = reader.u64();
  if (count != (length - 8) / 16) {
    co_return request_error(EIO, "Protocol error: extent count " + std::to_string(count) +
                                     " does not match the chunk length " + std::to_string(length));
  }
  auto taken = co_await take_extent(pending, context, extent_length, static_cast<uint32_t>(flags),
                                    length - 24);
  co_return taken;
}

aio::Task<Result<void>> ClientConnection::read_error_chunk(Pending& pending, uint16_t type,
                                                           uint32_t length) {
  if (length < 6 || length > kMaxChunkOverhead) {
    co_return request_error(EIO, "Protocol error: invalid payload length " +
                                     std::to_string(length) + " for an error chunk");
  }
  std::string payload(length, '\0');
  bool got = co_await transport_->read_exact(payload.data(), payload.size());
  if (!got) {
    co_return request_error(EIO, "the NBD server closed the connection");
  }
  WireReader reader(payload.data(), payload.size());
  uint32_t error = reader.u32();
  uint16_t message_length = reader.u16();
  if (error == 0) {
    co_return request_error(EIO, "Protocol error: server sent an error chunk with error = 0");
  }
  std::string message;
  if (type == kChunkError || type == kChunkErrorOffset) {
    size_t tail = type == kChunkErrorOffset ? 8 : 0;
    if (message_length > reader.remaining() || reader.remaining() - message_length != tail) {
      co_return request_error(EIO, "Protocol error: error chunk message length " +
                                       std::to_string(message_length) +
                                       " does not match the chunk length");
    }
    message = reader.bytes(message_length);
    if (type == kChunkErrorOffset) {
      uint64_t offset = reader.u64();
      if (offset < pending.offset || offset - pending.offset >= pending.length) {
        co_return request_error(EIO,
                                "Protocol error: server sent an error offset outside the request");
      }
    }
  }
  if (!pending.error) {
    int host = host_errno(error);
    std::string text = message.empty()
                           ? std::string("server failed the request: ") + std::strerror(host)
                           : "server reported: " + message;
    pending.error = request_error(host, text);
  }
  co_return ok();
}

}  // namespace strata::nbd
