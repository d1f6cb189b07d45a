#include "nbd/tls_transport.h"

#include <algorithm>
#include <cstring>

namespace strata::nbd {

namespace {

// Plaintext is encrypted and sent in pieces of this size, bounding the ciphertext held at once.
constexpr size_t kSendPiece = 256 * 1024;

}  // namespace

aio::Task<Result<std::unique_ptr<TlsTransport>>> TlsTransport::accept(
    Transport& lower, std::shared_ptr<const crypto::TlsCreds> creds,
    crypto::TlsSession::Authorizer authorize) {
  auto session = crypto::TlsSession::server(std::move(creds), std::move(authorize));
  if (!session) {
    co_return std::move(session).error();
  }
  std::unique_ptr<TlsTransport> transport(new TlsTransport(lower, std::move(session).value()));
  auto done = co_await transport->handshake();
  if (!done) {
    co_return std::move(done).error();
  }
  co_return transport;
}

aio::Task<Result<std::unique_ptr<TlsTransport>>> TlsTransport::connect(
    Transport& lower, std::shared_ptr<const crypto::TlsCreds> creds,
    std::optional<std::string> hostname) {
  auto session = crypto::TlsSession::client(std::move(creds), std::move(hostname));
  if (!session) {
    co_return std::move(session).error();
  }
  std::unique_ptr<TlsTransport> transport(new TlsTransport(lower, std::move(session).value()));
  auto done = co_await transport->handshake();
  if (!done) {
    co_return std::move(done).error();
  }
  co_return transport;
}

aio::Task<Result<void>> TlsTransport::handshake() {
  while (true) {
    auto step = session_->handshake();
    // Handshake messages and, on failure, the alert go out before anything else happens.
    bool sent = co_await flush();
    if (!step) {
      co_return std::move(step).error();
    }
    if (!sent) {
      co_return make_error(ErrorKind::kIo, "TLS handshake failed: connection lost");
    }
    if (*step == crypto::TlsSession::Status::kDone) {
      co_return ok();
    }
    bool got = co_await read_record();
    if (!got) {
      co_return make_error(ErrorKind::kProtocol,
                           "TLS handshake failed: connection closed or not a TLS record");
    }
  }
}

aio::Task<bool> TlsTransport::flush() {
  if (!session_->has_output()) {
    co_return !failed_;
  }
  auto guard = co_await send_lock_.scoped_lock();
  // Taken under the lock: every flush sends all ciphertext produced before it, in order.
  std::string ciphertext = session_->take_output();
  if (ciphertext.empty()) {
    co_return !failed_;
  }
  iovec iov{ciphertext.data(), ciphertext.size()};
  bool sent = co_await lower_->write_all({&iov, 1});
  if (!sent) {
    failed_ = true;
  }
  co_return sent;
}

aio::Task<bool> TlsTransport::read_record() {
  char header[5];
  bool got = co_await lower_->read_exact(header, sizeof(header));
  if (!got) {
    co_return false;
  }
  // Content types 20-24 (change_cipher_spec, alert, handshake, application_data, heartbeat)
  // with major version 3; anything else is not TLS.
  auto type = static_cast<uint8_t>(header[0]);
  if (type < 20 || type > 24 || static_cast<uint8_t>(header[1]) != 3) {
    co_return false;
  }
  size_t length =
      (static_cast<size_t>(static_cast<uint8_t>(header[3])) << 8) | static_cast<uint8_t>(header[4]);
  if (length > kMaxRecord) {
    co_return false;
  }
  std::string record(sizeof(header) + length, '\0');
  std::memcpy(record.data(), header, sizeof(header));
  if (length > 0) {
    got = co_await lower_->read_exact(record.data() + sizeof(header), length);
    if (!got) {
      co_return false;
    }
  }
  session_->feed(record.data(), record.size());
  co_return true;
}

aio::Task<bool> TlsTransport::read_exact(void* buffer, size_t length) {
  char* out = static_cast<char*>(buffer);
  while (length > 0) {
    if (failed_) {
      co_return false;
    }
    auto n = session_->read(out, length);
    if (!n) {
      failed_ = true;
      co_await flush();
      co_return false;
    }
    if (*n > 0) {
      out += *n;
      length -= *n;
      continue;
    }
    bool sent = co_await flush();
    if (!sent) {
      co_return false;
    }
    bool got = co_await read_record();
    if (!got) {
      failed_ = true;
      co_return false;
    }
  }
  co_return true;
}

aio::Task<bool> TlsTransport::write_all(std::span<const iovec> iov) {
  if (failed_) {
    co_return false;
  }
  size_t pending = 0;
  for (const iovec& v : iov) {
    const char* data = static_cast<const char*>(v.iov_base);
    size_t left = v.iov_len;
    while (left > 0) {
      size_t piece = std::min(left, kSendPiece);
      auto written = session_->write(data, piece);
      if (!written) {
        failed_ = true;
        co_return false;
      }
      data += piece;
      left -= piece;
      pending += piece;
      if (pending >= kSendPiece) {
        pending = 0;
        bool sent = co_await flush();
        if (!sent) {
          co_return false;
        }
      }
    }
  }
  co_return co_await flush();
}

void TlsTransport::shutdown() {
  failed_ = true;
  lower_->shutdown();
}

}  // namespace strata::nbd
