#include "block/drivers/http/http_node.h"

#include <algorithm>
#include <thread>

#include "aio/thread_pool.h"

namespace strata::block {

namespace {

constexpr size_t kCachedRanges = 8;
constexpr int kRetries = 3;
// QEMU's CURL_TIMEOUT_MAX.
constexpr int64_t kMaxTimeout = 10000;

// The workers that run transfers: enough for several reads in flight per origin.
aio::ThreadPool& transfer_pool() {
  static aio::ThreadPool pool(8);
  return pool;
}

std::unique_ptr<HttpOptions> parse_common(ArgDecoder& d, bool https) {
  auto options = std::make_unique<HttpOptions>();
  options->https = https;
  options->url = d.str("url");
  options->readahead = d.opt_size("readahead").value_or(256 * 1024);
  options->timeout = d.opt_i64("timeout").value_or(5);
  options->cookie = d.opt_str("cookie");
  options->cookie_secret = d.opt_str("cookie-secret");
  options->username = d.opt_str("username");
  options->password_secret = d.opt_str("password-secret");
  options->proxy_username = d.opt_str("proxy-username");
  options->proxy_password_secret = d.opt_str("proxy-password-secret");
  if (https) {
    options->ssl_verify = d.opt_bool("sslverify").value_or(true);
  }
  return options;
}

Error invalid(std::string message) {
  return make_error(ErrorKind::kInvalidArgument, std::move(message));
}

}  // namespace

std::unique_ptr<DriverOptions> HttpNode::parse_http(ArgDecoder& d) {
  return parse_common(d, false);
}

std::unique_ptr<DriverOptions> HttpNode::parse_https(ArgDecoder& d) {
  return parse_common(d, true);
}

Result<std::shared_ptr<Node>> HttpNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& o = static_cast<const HttpOptions&>(*options.driver_options);
  // QEMU's curl_open, in its order.
  CommonOptions common = context.options();
  if (!common.read_only) {
    if (!common.auto_read_only) {
      return make_error(ErrorKind::kPermission, "curl driver does not support writes");
    }
    common.read_only = true;
  }
  if (o.readahead % 512 != 0) {
    return invalid("HTTP_READAHEAD_SIZE " + std::to_string(o.readahead) +
                   " is not a multiple of 512");
  }
  if (o.timeout > kMaxTimeout || o.timeout < 0) {
    return invalid("timeout parameter is too large or negative");
  }
  for (const auto* secret : {&o.cookie_secret, &o.password_secret, &o.proxy_password_secret}) {
    if (*secret) {
      return invalid("No secret with id '" + **secret + "'");
    }
  }
  const std::string scheme = o.https ? "https" : "http";
  if (o.url.rfind(scheme + "://", 0) != 0) {
    return invalid(scheme + " curl driver cannot handle the URL '" + o.url +
                   "' (does not start with '" + scheme + "://')");
  }
  http::CurlSettings settings;
  settings.url = o.url;
  settings.timeout_seconds = static_cast<uint32_t>(o.timeout);
  settings.ssl_verify = o.ssl_verify;
  settings.cookie = o.cookie;
  settings.username = o.username;
  settings.proxy_username = o.proxy_username;
  auto length = http::probe_length(settings);
  if (!length) {
    return std::move(length).error();
  }
  auto node =
      std::make_shared<HttpNode>(common, o.https, std::move(settings), o.readahead, *length);
  return std::shared_ptr<Node>(std::move(node));
}

HttpNode::HttpNode(CommonOptions common, bool https, http::CurlSettings settings,
                   uint64_t readahead, uint64_t length)
    : Node(std::move(common)),
      https_(https),
      settings_(std::move(settings)),
      readahead_(readahead),
      length_(length) {}

bool HttpNode::read_cached(uint64_t offset, uint64_t bytes, const IoVector& qiov) {
  for (auto it = cache_.rbegin(); it != cache_.rend(); ++it) {
    const uint64_t start = it->offset;
    const uint64_t end = start + it->data->size();
    if (offset >= start && offset + bytes <= end) {
      qiov.copy_from(0, it->data->data() + (offset - start), bytes);
      return true;
    }
  }
  return false;
}

void HttpNode::remember(uint64_t offset, std::shared_ptr<const std::vector<char>> data) {
  if (cache_.size() == kCachedRanges) {
    cache_.erase(cache_.begin());
  }
  cache_.push_back({offset, std::move(data)});
}

aio::Task<Result<void>> HttpNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t flags) {
  (void)flags;
  if (offset >= length_) {
    qiov.fill(0, 0, bytes);
    co_return ok();
  }
  const uint64_t in_range = std::min(bytes, length_ - offset);
  if (in_range < bytes) {
    qiov.fill(in_range, 0, bytes - in_range);  // the request layer's last partial block
  }
  if (read_cached(offset, in_range, qiov)) {
    co_return ok();
  }
  const uint64_t fetch = std::min(in_range + readahead_, length_ - offset);
  auto data = std::make_shared<std::vector<char>>(fetch);
  // Only trivially destructible captures: GCC 12 may destroy a temporary in a co_await
  // expression twice. The node outlives its own requests.
  const http::CurlSettings* settings = &settings_;
  char* out = data->data();
  Result<void> fetched = co_await transfer_pool().run([settings, offset, fetch, out] {
    return http::fetch_range(*settings, offset, fetch, out, kRetries);
  });
  if (!fetched) {
    co_return fetched;
  }
  qiov.copy_from(0, data->data(), in_range);
  if (fetch > in_range) {
    remember(offset, std::move(data));
  }
  co_return ok();
}

}  // namespace strata::block
