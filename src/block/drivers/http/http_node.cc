#include "block/drivers/http/http_node.h"

#include <algorithm>
#include <cstdio>

#include "aio/event_loop.h"

namespace strata::block {

namespace {

// QEMU's bdrv_apply_auto_read_only for a driver that cannot write.
Result<void> apply_auto_read_only(CommonOptions& common) {
  if (common.read_only) {
    return ok();
  }
  if (!common.auto_read_only) {
    return Error(ErrorKind::kPermission, "curl driver does not support writes", EACCES);
  }
  common.read_only = true;
  return ok();
}

// The secret objects strata does not have (see http_node.h).
Result<void> refuse_secret(const std::optional<std::string>& id) {
  if (id) {
    return Error(ErrorKind::kNotFound, "No secret with id '" + *id + "'", ENOENT);
  }
  return ok();
}

}  // namespace

// One ranged GET: pending until `done`, then held by the cache (when it succeeded) until evicted.
// After `done` is set (under the node's mutex) nothing changes it any more.
struct HttpNode::Fetch {
  http::ByteRange range;
  bool done = false;
  http::TransferOutcome outcome = http::TransferOutcome::kOk;
  std::string message;
  std::vector<uint8_t> data;
  std::vector<std::shared_ptr<Waiter>> waiters;  // guarded by the node's mutex
};

// A reader suspended on a Fetch. `handle` is cleared (on the reader's loop) when the reader
// resumes or its frame goes away, so a wake-up posted late finds nothing to resume.
struct HttpNode::Waiter {
  aio::EventLoop* loop = nullptr;
  std::coroutine_handle<> handle;
};

// Suspends the awaiting reader until `fetch` is done; does not suspend when it already is.
class HttpNode::FetchAwaiter {
 public:
  FetchAwaiter(HttpNode& node, std::shared_ptr<Fetch> fetch)
      : node_(node), fetch_(std::move(fetch)) {}
  FetchAwaiter(const FetchAwaiter&) = delete;
  FetchAwaiter& operator=(const FetchAwaiter&) = delete;
  ~FetchAwaiter() {
    if (waiter_ != nullptr) {
      std::lock_guard lock(node_.mutex_);
      waiter_->handle = {};
      auto& waiters = fetch_->waiters;
      waiters.erase(std::remove(waiters.begin(), waiters.end(), waiter_), waiters.end());
    }
  }

  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> handle) {
    std::lock_guard lock(node_.mutex_);
    if (fetch_->done) {
      return false;
    }
    waiter_ = std::make_shared<Waiter>(Waiter{aio::EventLoop::current(), handle});
    fetch_->waiters.push_back(waiter_);
    return true;
  }
  void await_resume() const noexcept {}

 private:
  HttpNode& node_;
  std::shared_ptr<Fetch> fetch_;
  std::shared_ptr<Waiter> waiter_;
};

std::unique_ptr<DriverOptions> HttpNode::parse_http(ArgDecoder& d) {
  return std::make_unique<http::HttpOptions>(http::parse_http_options(d, "http"));
}

std::unique_ptr<DriverOptions> HttpNode::parse_https(ArgDecoder& d) {
  return std::make_unique<http::HttpOptions>(http::parse_http_options(d, "https"));
}

// QEMU's curl_open, in its order.
Result<std::shared_ptr<Node>> HttpNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& http_options = static_cast<const http::HttpOptions&>(*options.driver_options);
  CommonOptions common = context.options();
  auto read_only = apply_auto_read_only(common);
  if (!read_only) {
    return std::move(read_only).error();
  }
  auto checked = http::check_http_options(http_options);
  if (!checked) {
    return std::move(checked).error();
  }
  for (const auto* secret : {&http_options.cookie_secret, &http_options.password_secret,
                             &http_options.proxy_password_secret}) {
    auto found = refuse_secret(*secret);
    if (!found) {
      return std::move(found).error();
    }
  }
  http::RequestConfig config;
  config.url = http_options.url;
  config.verify_peer = http_options.verify_peer();
  config.timeout_seconds = http_options.timeout_seconds();
  config.cookie = http_options.cookie;
  config.username = http_options.username;
  config.proxy_username = http_options.proxy_username;
  auto client = http::CurlClient::create(std::move(config));
  if (!client) {
    return std::move(client).error();
  }
  auto length = (*client)->probe_length();
  if (!length) {
    return std::move(length).error();
  }
  auto node = std::make_shared<HttpNode>(common, http_options);
  node->origin_length_ = *length;
  node->cache_ = std::make_unique<http::ReadaheadCache>(*length, http_options.readahead_bytes(),
                                                        kCachedRanges);
  node->client_ = std::move(client).value();
  return std::shared_ptr<Node>(std::move(node));
}

HttpNode::HttpNode(CommonOptions common, http::HttpOptions options)
    : Node(std::move(common)), options_http_(std::move(options)) {
  read_only_ = true;
}

HttpNode::~HttpNode() {
  // The client's thread calls fetch_done until it stops; stop it while the rest is intact.
  client_.reset();
}

std::optional<std::string> HttpNode::exact_filename() const {
  if (http::url_names_node(options_http_)) {
    return options_http_.url;
  }
  return std::nullopt;
}

nlohmann::json HttpNode::strong_options() const {
  return http::strong_http_options(options_http_);
}

void HttpNode::fetch_done(uint64_t id, http::FetchResult result) {
  std::lock_guard lock(mutex_);
  auto it = fetches_.find(id);
  if (it == fetches_.end()) {
    return;
  }
  std::shared_ptr<Fetch> fetch = it->second;
  const bool succeeded = result.outcome == http::TransferOutcome::kOk;
  fetch->done = true;
  fetch->outcome = result.outcome;
  fetch->message = std::move(result.message);
  fetch->data = std::move(result.body);
  if (!succeeded) {
    fetches_.erase(it);
  }
  for (uint64_t evicted : cache_->complete(id, succeeded)) {
    fetches_.erase(evicted);
  }
  for (auto& waiter : fetch->waiters) {
    waiter->loop->post([waiter] {
      if (auto handle = waiter->handle) {
        waiter->handle = {};
        handle.resume();
      }
    });
  }
  fetch->waiters.clear();
}

void HttpNode::report_transfer_error(const std::string& message) {
  const int count = reported_errors_.fetch_add(1);
  if (count < kReportedErrors) {
    std::fprintf(stderr, "curl: %s\n", message.c_str());
    if (count + 1 == kReportedErrors) {
      std::fprintf(stderr, "curl: further errors suppressed\n");
    }
  }
}

aio::Task<Result<void>> HttpNode::read_once(uint64_t offset, uint64_t end, IoVector qiov) {
  // Plans the whole read first, so that every fetch it needs is in flight at once: a part held
  // in the cache is copied at once, the others wait below for their pending or new fetch.
  struct Part {
    std::shared_ptr<Fetch> fetch;
    uint64_t begin = 0;
    uint64_t end = 0;
  };
  std::vector<Part> waits;
  std::vector<std::pair<uint64_t, http::ByteRange>> starts;
  {
    std::lock_guard lock(mutex_);
    for (uint64_t position = offset; position < end;) {
      const http::ReadaheadCache::Step step = cache_->next(position, end);
      const uint64_t part_end = std::min(end, step.range.end);
      std::shared_ptr<Fetch> fetch;
      if (step.kind == http::ReadaheadCache::Step::Kind::kFetch) {
        fetch = std::make_shared<Fetch>();
        fetch->range = step.range;
        fetches_.emplace(step.id, fetch);
        starts.emplace_back(step.id, step.range);
      } else {
        fetch = fetches_.at(step.id);
      }
      if (step.kind == http::ReadaheadCache::Step::Kind::kCopy) {
        qiov.copy_from(position - offset, fetch->data.data() + (position - step.range.begin),
                       part_end - position);
      } else {
        waits.push_back({std::move(fetch), position, part_end});
      }
      position = part_end;
    }
  }
  for (const auto& [id, range] : starts) {
    client_->fetch(
        range, [this, id = id](http::FetchResult result) { fetch_done(id, std::move(result)); });
  }
  for (const Part& part : waits) {
    co_await FetchAwaiter(*this, part.fetch);
    // `done` was seen under the mutex (or the wake-up was posted under it): the fetch is final.
    const Fetch& fetch = *part.fetch;
    if (fetch.outcome != http::TransferOutcome::kOk) {
      const ErrorKind kind = fetch.outcome == http::TransferOutcome::kTransient
                                 ? ErrorKind::kIo
                                 : ErrorKind::kProtocol;
      co_return Error(kind, fetch.message, EIO);
    }
    qiov.copy_from(part.begin - offset, fetch.data.data() + (part.begin - fetch.range.begin),
                   part.end - part.begin);
  }
  co_return ok();
}

aio::Task<Result<void>> HttpNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t) {
  const uint64_t end = std::min(offset + bytes, origin_length_);
  for (int attempt = 0; offset < end; ++attempt) {
    Result<void> read = co_await read_once(offset, end, qiov);
    if (read) {
      break;
    }
    report_transfer_error(read.error().message());
    // read_once marks transient failures kIo and the others kProtocol.
    if (read.error().kind() != ErrorKind::kIo || attempt == kMaxRetries) {
      co_return Error(ErrorKind::kIo, "curl: " + read.error().message(), EIO);
    }
    aio::EventLoop* loop = aio::EventLoop::current();
    int slept = co_await loop->sleep_for(kFirstRetryDelay * (1 << attempt));
    (void)slept;  // -ETIME normally; -ECANCELED only at teardown
  }
  // The origin's length is rounded up to 512 bytes: the rest reads as zeroes (QEMU's
  // curl_find_buf).
  const uint64_t served = end > offset ? end - offset : 0;
  if (served < bytes) {
    qiov.fill(served, 0, bytes - served);
  }
  co_return ok();
}

}  // namespace strata::block
