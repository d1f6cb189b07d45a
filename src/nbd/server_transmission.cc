// Transmission of ServerConnection: reading requests, running them, sending replies.

#include "nbd/server_connection.h"

#include <algorithm>
#include <cstring>

#include "block/io/request.h"
#include "nbd/allocation.h"
#include "nbd/protocol.h"
#include "nbd/server_connection_internal.h"

namespace strata::nbd {

using namespace detail;

aio::Task<void> ServerConnection::transmission() {
  if (export_->shutting_down()) {
    co_return;
  }
  export_->add_connection(*this);
  registered_ = true;
  transport_.set_io_loop(export_->config().io_loop);
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
    if (context >= kContextFirstBitmap) {
      // QEMU's bitmap_to_extents: dirty runs carry NBD_STATE_DIRTY, byte-exact within the
      // request; anything past the bitmap's end reads as clean.
      const block::bitmap::DirtyBitmap& bitmap =
          *export_->config().bitmap_sources[context - kContextFirstBitmap];
      const uint64_t at = offset + done;
      const bool dirty = bitmap.test(at);
      const std::optional<uint64_t> change = dirty ? bitmap.next_zero(at) : bitmap.next_dirty(at);
      const uint64_t change_at =
          dirty ? change.value_or(bitmap.size()) : change.value_or(UINT64_MAX);
      run_length = std::min(length - done, std::max(change_at, at + 1) - at);
      flags = dirty ? kStateDirty : 0;
    }
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
