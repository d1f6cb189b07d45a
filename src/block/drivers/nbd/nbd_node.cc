#include "block/drivers/nbd/nbd_node.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <thread>

#include "block/graph/graph.h"
#include "crypto/object_table.h"
#include "nbd/protocol.h"

namespace strata::block {

namespace {

using namespace std::chrono_literals;

constexpr auto kFirstRetryDelay = 100ms;
constexpr auto kMaxRetryDelay = 2s;

Error lost_connection() {
  return Error(ErrorKind::kIo, "The NBD connection is lost and not re-established yet", EIO);
}

uint64_t align_down(uint64_t value, uint64_t alignment) {
  return value - value % alignment;
}

}  // namespace

struct NbdNode::Session {
  int fd = -1;
  nbd::ExportInfo info;
  aio::EventLoop* transport_loop = nullptr;
  std::unique_ptr<nbd::SocketTransport> transport;
  // With tls-creds: the TLS session over `transport`, which the connection uses.
  std::unique_ptr<nbd::TlsTransport> tls;
  std::unique_ptr<nbd::ClientConnection> connection;  // set when the reader starts

  Session() = default;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() {
    connection.reset();
    tls.reset();
    transport.reset();
    if (fd >= 0) {
      ::close(fd);
    }
  }
};

// QEMU's nbd_get_tls_creds: the client credentials object `id` names.
Result<std::shared_ptr<const crypto::TlsCreds>> client_tls_creds(const Graph& graph,
                                                                 const std::string& id) {
  const crypto::ObjectTable* objects = graph.crypto_objects();
  if (objects == nullptr) {
    return make_error(ErrorKind::kNotFound, "No TLS credentials with id '" + id + "'");
  }
  return objects->find_tls_creds(id, crypto::TlsEndpoint::kClient, graph.has_other_object(id));
}

Result<std::shared_ptr<Node>> NbdNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& nbd_options = static_cast<const NbdOptions&>(*options.driver_options);
  std::shared_ptr<const crypto::TlsCreds> tls_creds;
  if (nbd_options.tls_creds) {
    auto creds = client_tls_creds(context.graph(), *nbd_options.tls_creds);
    if (!creds) {
      return std::move(creds).error();
    }
    tls_creds = std::move(creds).value();
  }
  // As in QEMU, tls-hostname without credentials is accepted and unused.
  auto node = std::make_shared<NbdNode>(context.options(), nbd_options);
  node->tls_creds_ = std::move(tls_creds);
  auto connected = node->connect_at_open();
  if (!connected) {
    return std::move(connected).error();
  }
  return std::shared_ptr<Node>(std::move(node));
}

NbdNode::NbdNode(CommonOptions common, const NbdOptions& options)
    : Node(std::move(common)), options_nbd_(options) {
  handshake_.export_name = options.export_name.value_or("");
  handshake_.meta_context = options.dirty_bitmap.value_or("base:allocation");
}

NbdNode::~NbdNode() {
  // NBD_CMD_DISC, best effort and without waiting: the server learns the client left on purpose.
  // (Not over TLS: the request would have to be encrypted on a loop that may be gone.)
  if (session_ && session_->tls == nullptr &&
      !(session_->connection && session_->connection->broken())) {
    std::string request;
    nbd::WireWriter w(request);
    w.u32(nbd::kRequestMagic);
    w.u16(0);
    w.u16(nbd::kCmdDisc);
    w.u64(0);
    w.u64(0);
    w.u32(0);
    ssize_t sent =
        ::send(session_->fd, request.data(), request.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    (void)sent;
  }
}

aio::Task<Result<std::shared_ptr<NbdNode::Session>>> NbdNode::establish(aio::EventLoop& loop) {
  auto fd = co_await nbd::connect_to_server(loop, options_nbd_.server);
  if (!fd) {
    co_return std::move(fd).error();
  }
  auto session = std::make_shared<Session>();
  session->fd = *fd;
  nbd::SocketTransport transport(loop, *fd);
  std::optional<nbd::ClientTls> tls;
  if (tls_creds_ != nullptr) {
    tls.emplace();
    tls->creds = tls_creds_;
    // QEMU checks the certificate against the inet host unless tls-hostname says otherwise.
    tls->hostname = options_nbd_.tls_hostname;
    if (!tls->hostname && options_nbd_.server.type == nbd::ServerAddress::Type::kInet) {
      tls->hostname = options_nbd_.server.host;
    }
  }
  auto info = co_await nbd::client_handshake(transport, handshake_, tls ? &*tls : nullptr);
  if (!info) {
    co_return std::move(info).error();
  }
  if (tls) {
    // Bound to a transport of its session's loop before first use (bind_to_current_loop).
    session->tls = std::move(tls->transport);
  }
  if (options_nbd_.dirty_bitmap && !info->has_meta_context) {
    // QEMU 10 reports the generic open failure here.
    co_return Error(ErrorKind::kNotFound, "Could not open image: Invalid argument", EINVAL);
  }
  if (session_ != nullptr && (info->size != info_.size || info->flags != info_.flags)) {
    co_return Error(ErrorKind::kIo, "The NBD export changed its size or flags across a reconnect",
                    EIO);
  }
  session->info = *info;
  co_return session;
}

Result<void> NbdNode::connect_at_open() {
  auto loop = aio::EventLoop::create(16);
  if (!loop) {
    return std::move(loop).error();
  }
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(options_nbd_.open_timeout);
  for (;;) {
    auto session = (*loop)->block_on(establish(**loop));
    if (session) {
      session_ = std::move(session).value();
      break;
    }
    // Only a failed connect is worth retrying; a server that answered and refused is final.
    const bool refused_by_server = session.error().kind() != ErrorKind::kIo ||
                                   session.error().message().rfind("Failed to connect", 0) != 0;
    if (refused_by_server || std::chrono::steady_clock::now() >= deadline) {
      return std::move(session).error();
    }
    std::this_thread::sleep_for(kFirstRetryDelay);
  }
  info_ = session_->info;
  if ((info_.flags & nbd::kFlagReadOnly) != 0 && !read_only_) {
    // QEMU's bdrv_apply_auto_read_only.
    if (!options_.auto_read_only) {
      // QEMU reports this as the generic open failure with EACCES.
      return Error(ErrorKind::kPermission, "Could not open image: Permission denied", EACCES);
    }
    read_only_ = true;
    options_.read_only = true;
  }
  // QEMU's nbd_refresh_limits.
  uint32_t min = info_.min_block;
  if (min == 0) {
    min = (info_.size % 512 != 0 || info_.has_meta_context) ? 1 : 512;
  }
  const uint32_t max =
      info_.max_block != 0 ? std::min(info_.max_block, nbd::kMaxBufferSize) : nbd::kMaxBufferSize;
  limits_.request_alignment = min;
  limits_.max_transfer = max;
  limits_.max_pwrite_zeroes = max;
  limits_.max_pdiscard = align_down(INT_MAX, min);
  return ok();
}

Result<void> NbdNode::bind_to_current_loop(Session& session) {
  aio::EventLoop* loop = aio::EventLoop::current();
  if (loop_ == nullptr || loop_ == session.transport_loop) {
    loop_ = loop;
  }
  if (session.transport_loop == loop && session.connection != nullptr) {
    return ok();
  }
  if (session.connection != nullptr && !session.connection->idle()) {
    return Error(ErrorKind::kBusy, "NBD node used from two event loops at once", EBUSY);
  }
  // The connection is idle: no coroutine waits on the old loop, and no reply is outstanding, so
  // nothing is buffered in the old transport.
  auto transport = std::make_unique<nbd::SocketTransport>(*loop, session.fd);
  nbd::Transport* carrier = transport.get();
  if (session.tls != nullptr) {
    session.tls->rebind(*transport);
    carrier = session.tls.get();
  }
  if (session.connection == nullptr) {
    session.connection = std::make_unique<nbd::ClientConnection>(*carrier, session.info);
  } else {
    session.connection->rebind(*carrier);
  }
  session.transport = std::move(transport);
  session.transport_loop = loop;
  return ok();
}

void NbdNode::set_state(State state) {
  state_ = state;
  state_changed_.notify_all();
}

bool NbdNode::retry_after(const Session& session) {
  if (session.connection == nullptr || !session.connection->broken()) {
    return false;
  }
  if (session_.get() == &session && state_ == State::kConnected) {
    ++break_generation_;
    if (options_nbd_.reconnect_delay > 0) {
      set_state(State::kWaiting);
      tasks_.spawn(end_wait_after_delay(break_generation_));
    } else {
      set_state(State::kFailing);
    }
    tasks_.spawn(reconnect());
  }
  return state_ == State::kWaiting || (state_ == State::kConnected && session_.get() != &session);
}

aio::Task<void> NbdNode::end_wait_after_delay(uint64_t generation) {
  int expired = co_await loop_->sleep_for(std::chrono::seconds(options_nbd_.reconnect_delay));
  if (expired == -ECANCELED) {
    co_return;
  }
  if (generation == break_generation_ && state_ == State::kWaiting) {
    set_state(State::kFailing);
  }
}

aio::Task<void> NbdNode::reconnect() {
  std::chrono::nanoseconds delay = kFirstRetryDelay;
  for (;;) {
    auto session = co_await establish(*loop_);
    if (session) {
      session_ = std::move(session).value();
      set_state(State::kConnected);
      co_return;
    }
    int slept = co_await loop_->sleep_for(delay);
    if (slept == -ECANCELED) {
      co_return;
    }
    delay = std::min<std::chrono::nanoseconds>(delay * 2, kMaxRetryDelay);
  }
}

aio::Task<Result<std::shared_ptr<NbdNode::Session>>> NbdNode::usable_session() {
  for (;;) {
    if (state_ == State::kConnected) {
      if (session_->connection != nullptr && session_->connection->broken()) {
        (void)retry_after(*session_);
        continue;
      }
      auto bound = bind_to_current_loop(*session_);
      if (!bound) {
        co_return std::move(bound).error();
      }
      co_return session_;
    }
    if (state_ == State::kWaiting) {
      co_await state_changed_.wait();
      continue;
    }
    co_return lost_connection();
  }
}

aio::Task<Result<void>> NbdNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                           uint32_t) {
  for (;;) {
    auto session = co_await usable_session();
    if (!session) {
      co_return std::move(session).error();
    }
    auto done = co_await (*session)->connection->read(offset, qiov.slice(0, bytes));
    if (done || !retry_after(**session)) {
      co_return done;
    }
  }
}

aio::Task<Result<void>> NbdNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t flags) {
  const bool fua = (flags & kRequestFua) != 0;
  const bool server_fua = (info_.flags & nbd::kFlagSendFua) != 0;
  for (;;) {
    auto session = co_await usable_session();
    if (!session) {
      co_return std::move(session).error();
    }
    auto done = co_await (*session)->connection->write(
        offset, qiov.slice(0, bytes),
        static_cast<uint16_t>(fua && server_fua ? nbd::kCmdFlagFua : 0));
    if (done || !retry_after(**session)) {
      if (done && fua && !server_fua) {
        auto flushed = co_await co_flush();
        co_return flushed;
      }
      co_return done;
    }
  }
}

aio::Task<Result<void>> NbdNode::co_flush() {
  if ((info_.flags & nbd::kFlagSendFlush) == 0) {
    co_return ok();
  }
  for (;;) {
    auto session = co_await usable_session();
    if (!session) {
      co_return std::move(session).error();
    }
    auto done = co_await (*session)->connection->command(nbd::kCmdFlush, 0, 0, 0);
    if (done || !retry_after(**session)) {
      co_return done;
    }
  }
}

aio::Task<Result<void>> NbdNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  if ((info_.flags & nbd::kFlagSendTrim) == 0 || bytes == 0) {
    co_return ok();
  }
  for (;;) {
    auto session = co_await usable_session();
    if (!session) {
      co_return std::move(session).error();
    }
    auto done = co_await (*session)->connection->command(nbd::kCmdTrim, 0, offset,
                                                         static_cast<uint32_t>(bytes));
    if (done || !retry_after(**session)) {
      co_return done;
    }
  }
}

aio::Task<Result<void>> NbdNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t flags) {
  if ((info_.flags & nbd::kFlagSendWriteZeroes) == 0) {
    co_return Error(ErrorKind::kUnsupported, "server does not support write zeroes", ENOTSUP);
  }
  uint16_t nbd_flags = 0;
  if ((flags & kRequestFua) != 0 && (info_.flags & nbd::kFlagSendFua) != 0) {
    nbd_flags = static_cast<uint16_t>(nbd_flags | nbd::kCmdFlagFua);
  }
  if ((flags & kRequestMayUnmap) == 0) {
    nbd_flags = static_cast<uint16_t>(nbd_flags | nbd::kCmdFlagNoHole);
  }
  if ((flags & kRequestNoFallback) != 0) {
    if ((info_.flags & nbd::kFlagSendFastZero) == 0) {
      co_return Error(ErrorKind::kUnsupported, "server does not support fast zero", ENOTSUP);
    }
    nbd_flags = static_cast<uint16_t>(nbd_flags | nbd::kCmdFlagFastZero);
  }
  for (;;) {
    auto session = co_await usable_session();
    if (!session) {
      co_return std::move(session).error();
    }
    auto done = co_await (*session)->connection->command(nbd::kCmdWriteZeroes, nbd_flags, offset,
                                                         static_cast<uint32_t>(bytes));
    if (done || !retry_after(**session)) {
      if (done && (flags & kRequestFua) != 0 && (info_.flags & nbd::kFlagSendFua) == 0) {
        auto flushed = co_await co_flush();
        co_return flushed;
      }
      co_return done;
    }
  }
}

aio::Task<Result<BlockStatus>> NbdNode::co_block_status(uint64_t offset, uint64_t bytes) {
  BlockStatus status;
  status.bytes = bytes;
  status.map_offset = offset;
  status.file = this;
  status.flags = BlockStatus::kData | BlockStatus::kOffsetValid | BlockStatus::kAllocated;
  if (!info_.has_meta_context) {
    co_return status;
  }
  // QEMU's nbd_client_co_block_status: one extent (REQ_ONE) of at most INT_MAX aligned bytes.
  const uint64_t length = std::min<uint64_t>(
      {bytes, info_.size - offset, align_down(INT_MAX, limits_.request_alignment)});
  for (;;) {
    auto session = co_await usable_session();
    if (!session) {
      co_return std::move(session).error();
    }
    auto extent =
        co_await (*session)->connection->block_status(offset, static_cast<uint32_t>(length));
    if (extent) {
      status.bytes = extent->length;
      status.flags = BlockStatus::kOffsetValid | BlockStatus::kAllocated;
      if ((extent->flags & nbd::kStateHole) == 0) {
        status.flags |= BlockStatus::kData;
      }
      if ((extent->flags & nbd::kStateZero) != 0) {
        status.flags |= BlockStatus::kZero;
      }
      co_return status;
    }
    if (!retry_after(**session)) {
      co_return std::move(extent).error();
    }
  }
}

aio::Task<Result<void>> NbdNode::co_truncate(uint64_t new_size, bool exact) {
  if (new_size != info_.size && exact) {
    co_return Error(ErrorKind::kUnsupported, "Cannot resize NBD nodes", ENOTSUP);
  }
  if (new_size > info_.size) {
    co_return Error(ErrorKind::kInvalidArgument, "Cannot grow NBD nodes", EINVAL);
  }
  co_return ok();
}

nlohmann::json NbdNode::server_json() const {
  const auto& server = options_nbd_.server;
  if (server.type == nbd::ServerAddress::Type::kUnix) {
    return {{"type", "unix"}, {"path", server.path}};
  }
  return {{"type", "inet"}, {"host", server.host}, {"port", server.port}};
}

nlohmann::json NbdNode::strong_options() const {
  nlohmann::json options = {{"server", server_json()}};
  if (options_nbd_.export_name) {
    options["export"] = *options_nbd_.export_name;
  }
  return options;
}

std::optional<std::string> NbdNode::exact_filename() const {
  // QEMU's nbd_refresh_filename.
  const auto& server = options_nbd_.server;
  const auto& name = options_nbd_.export_name;
  if (server.type == nbd::ServerAddress::Type::kUnix) {
    if (name) {
      return "nbd+unix:///" + *name + "?socket=" + server.path;
    }
    return "nbd+unix://?socket=" + server.path;
  }
  if (name) {
    return "nbd://" + server.host + ":" + server.port + "/" + *name;
  }
  return "nbd://" + server.host + ":" + server.port;
}

}  // namespace strata::block
