#pragma once
// The `http` and `https` drivers: a read-only node whose bytes are a file on a web server
// (QEMU's block/curl.c), the remote origin of a stream or a backing file.
//
// Open: QEMU's checks and texts (read-only or auto-read-only, then the options, see
// http_options.h), then one HEAD request for the length, which also must say
// "Accept-Ranges: bytes". The node's length is that length rounded up to 512 bytes, as QEMU
// reports it; reads past the origin's end return zeroes.
//
// Reads: ranged GETs through a CurlClient, several in flight. Every fetch runs `readahead` bytes
// past the read that started it and is kept in a small cache (readahead_cache.h), so sequential
// small reads do not each make a request; reads that fall into a fetch still in flight wait for
// it instead of asking again. A read that meets a transient failure (refused or reset
// connection, timeout, HTTP 5xx, see classify_transfer) tries again, up to kMaxRetries more times
// with a doubling pause, and then fails with EIO; other failures fail it at once. Each failure is
// reported on stderr as "curl: <reason>" (QEMU's error_report).
//
// Secrets: strata has no `secret` objects, so cookie-secret, password-secret and
// proxy-password-secret fail at open with QEMU's "No secret with id 'X'".

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>

#include "block/drivers/driver.h"
#include "block/drivers/http/curl_client.h"
#include "block/drivers/http/http_options.h"
#include "block/drivers/http/readahead_cache.h"

namespace strata::block {

class HttpNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse_http(ArgDecoder& d);
  static std::unique_ptr<DriverOptions> parse_https(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  static constexpr int kMaxRetries = 4;
  static constexpr std::chrono::milliseconds kFirstRetryDelay{100};
  static constexpr size_t kCachedRanges = 8;

  HttpNode(CommonOptions common, http::HttpOptions options);
  ~HttpNode() override;

  const char* driver_name() const override { return options_http_.scheme.c_str(); }
  std::optional<std::string> exact_filename() const override;
  nlohmann::json strong_options() const override;

  // Contract (besides Node's): never writes into the caller's buffer after returning, even when
  // the read fails or its frame is destroyed mid-wait (fetched bytes land in the node's buffers
  // and are copied out on the reader's own loop).
  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;
  uint64_t length() const override { return (origin_length_ + 511) / 512 * 512; }
  std::optional<uint64_t> allocated_size() const override { return std::nullopt; }

 private:
  struct Fetch;
  struct Waiter;
  class FetchAwaiter;

  // Serves [offset, end) of the origin into `qiov` (whose byte 0 is `offset`), from held ranges,
  // pending fetches and new fetches, all of them planned and started before it first waits. One
  // try: the first failed fetch ends it, with libcurl's text and kind kIo when it was transient
  // (worth another try), kProtocol otherwise.
  aio::Task<Result<void>> read_once(uint64_t offset, uint64_t end, IoVector qiov);
  // Called on the client's thread when the fetch `id` ends.
  void fetch_done(uint64_t id, http::FetchResult result);
  // QEMU's error_report("curl: %s"), quiet after kReportedErrors reports.
  void report_transfer_error(const std::string& message);
  static constexpr int kReportedErrors = 100;

  http::HttpOptions options_http_;
  uint64_t origin_length_ = 0;
  std::mutex mutex_;  // guards cache_ and fetches_ (taken by readers and the client's thread)
  std::unique_ptr<http::ReadaheadCache> cache_;
  std::map<uint64_t, std::shared_ptr<Fetch>> fetches_;  // by cache id: pending and held
  std::atomic<int> reported_errors_{0};
  std::unique_ptr<http::CurlClient> client_;  // last: stops its thread before the rest goes
};

}  // namespace strata::block
