#pragma once
// CurlClient: ranged GETs of one URL over libcurl's multi interface, several in flight on a few
// reused connections, run by a thread of the client's own.
//
// Why a thread and not the caller's EventLoop: an http node is read from more than one loop (a
// private loop while a format driver opens over it, then its home loop), and libcurl wants one
// driver for all of a multi handle's sockets and timers. The thread owns the multi handle
// outright (no locking around libcurl) and only hands finished transfers back; the node resumes
// each waiting coroutine on the loop it was suspended on (EventLoop::post).
//
// Threading: create(), probe_length() and the destructor on the owner's thread; fetch() from any
// thread. `done` callbacks run on the client's thread, one at a time.

#include <curl/curl.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/result.h"
#include "block/drivers/http/readahead_cache.h"

namespace strata::block::http {

// What every request of a node carries (secrets already resolved).
struct RequestConfig {
  std::string url;
  bool verify_peer = true;
  uint32_t timeout_seconds = 5;
  std::optional<std::string> cookie;
  std::optional<std::string> username;
  std::optional<std::string> password;
  std::optional<std::string> proxy_username;
  std::optional<std::string> proxy_password;
};

// How a transfer ended: worth another try (the origin or the network failed for now) or not.
enum class TransferOutcome { kOk, kTransient, kFatal };

// kTransient for failures that a later try may not meet: connection refused or reset, timeouts,
// a body cut short, HTTP 408, 429 and 5xx. kFatal for the rest (404, TLS verification, ...).
TransferOutcome classify_transfer(CURLcode code, long http_status);

// QEMU's curl_header_cb test on one response header line: whether it says "Accept-Ranges: bytes"
// (the header name matched without regard to case, as HTTP/2 sends it in lower case).
bool accepts_byte_ranges(std::string_view header_line);

struct FetchResult {
  TransferOutcome outcome = TransferOutcome::kOk;
  std::string message;        // libcurl's error text (or ours) unless kOk
  std::vector<uint8_t> body;  // exactly the range's bytes when kOk
};
using FetchDone = std::function<void(FetchResult)>;

class CurlClient {
 public:
  static Result<std::unique_ptr<CurlClient>> create(RequestConfig config);
  // Stops the thread. Transfers still in flight are dropped without calling their `done`: the
  // owner has no reader waiting any more (a node is drained before it closes).
  ~CurlClient();
  CurlClient(const CurlClient&) = delete;
  CurlClient& operator=(const CurlClient&) = delete;

  // One blocking HEAD request (QEMU's curl_open): the origin's length. Fails with
  // "CURL: Error opening file: ..." when the request fails, the server reports no length or does
  // not accept byte ranges.
  Result<uint64_t> probe_length();

  // Starts a GET of `range`; `done` gets the body or the reason it failed.
  void fetch(ByteRange range, FetchDone done);

  // Transfers handed to libcurl at once; more wait in its queue for a free connection.
  static constexpr long kMaxConnections = 8;

 private:
  struct Transfer;
  explicit CurlClient(RequestConfig config);
  CURL* new_handle(char* error_buffer) const;
  void run();
  void start_queued();
  void finish(CURL* easy, CURLcode code);

  const RequestConfig config_;
  CURLM* multi_ = nullptr;                         // owned by the thread once it runs
  std::vector<std::unique_ptr<Transfer>> active_;  // the thread's
  std::mutex mutex_;
  std::vector<std::unique_ptr<Transfer>> queued_;  // guarded by mutex_
  bool stopping_ = false;                          // guarded by mutex_
  std::thread thread_;
};

}  // namespace strata::block::http
