#include "block/drivers/http/curl_client.h"

#include <algorithm>
#include <cctype>
#include <cstring>

namespace strata::block::http {

namespace {

constexpr std::string_view kNoRanges = "Server does not support 'range' (byte ranges).";

Result<void> init_libcurl() {
  static std::once_flag once;
  static CURLcode code = CURLE_OK;
  std::call_once(once, [] { code = curl_global_init(CURL_GLOBAL_ALL); });
  if (code != CURLE_OK) {
    return Error(ErrorKind::kIo,
                 "libcurl initialization failed with " + std::to_string(static_cast<int>(code)),
                 EIO);
  }
  return ok();
}

// libcurl's text for a failed transfer: its error buffer when filled, else the code's name.
std::string curl_message(CURLcode code, const char* error_buffer) {
  if (error_buffer[0] != '\0') {
    return error_buffer;
  }
  return curl_easy_strerror(code);
}

bool equal_ignoring_case(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

size_t on_probe_header(char* data, size_t size, size_t count, void* accepts) {
  const size_t bytes = size * count;
  if (accepts_byte_ranges(std::string_view(data, bytes))) {
    *static_cast<bool*>(accepts) = true;
  }
  return bytes;
}

}  // namespace

TransferOutcome classify_transfer(CURLcode code, long http_status) {
  switch (code) {
    case CURLE_OK:
      return TransferOutcome::kOk;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return TransferOutcome::kTransient;
    case CURLE_HTTP_RETURNED_ERROR:
      if (http_status == 408 || http_status == 429 || http_status >= 500) {
        return TransferOutcome::kTransient;
      }
      return TransferOutcome::kFatal;
    default:
      return TransferOutcome::kFatal;
  }
}

bool accepts_byte_ranges(std::string_view line) {
  const auto colon = line.find(':');
  if (colon == std::string_view::npos ||
      !equal_ignoring_case(line.substr(0, colon), "accept-ranges")) {
    return false;
  }
  std::string_view value = line.substr(colon + 1);
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) {
    value.remove_prefix(1);
  }
  while (!value.empty() && std::isspace(static_cast<unsigned char>(value.back()))) {
    value.remove_suffix(1);
  }
  return equal_ignoring_case(value, "bytes");
}

// One GET in flight; lives in active_ while libcurl has its handle.
struct CurlClient::Transfer {
  ByteRange range;
  FetchDone done;
  CURL* easy = nullptr;
  std::string range_header;
  std::vector<uint8_t> body;
  bool ranges_refused = false;  // the server answered 200 to a range that is not the whole file
  bool overflow = false;        // more bytes than asked for
  char error_buffer[CURL_ERROR_SIZE] = {};

  ~Transfer() {
    if (easy != nullptr) {
      curl_easy_cleanup(easy);
    }
  }

  static size_t on_body(char* data, size_t size, size_t count, void* opaque) {
    auto* t = static_cast<Transfer*>(opaque);
    const size_t bytes = size * count;
    if (t->body.empty()) {
      long status = 0;
      curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
      if (status != 206 && t->range.begin != 0) {
        t->ranges_refused = true;
        return 0;  // aborts the transfer (CURLE_WRITE_ERROR)
      }
    }
    if (t->body.size() + bytes > t->range.size()) {
      t->overflow = true;
      return 0;
    }
    t->body.insert(t->body.end(), data, data + bytes);
    return bytes;
  }
};

CurlClient::CurlClient(RequestConfig config) : config_(std::move(config)) {}

Result<std::unique_ptr<CurlClient>> CurlClient::create(RequestConfig config) {
  auto initialized = init_libcurl();
  if (!initialized) {
    return std::move(initialized).error();
  }
  std::unique_ptr<CurlClient> client(new CurlClient(std::move(config)));
  client->multi_ = curl_multi_init();
  if (client->multi_ == nullptr) {
    return Error(ErrorKind::kIo, "curl: could not create a multi handle", EIO);
  }
  curl_multi_setopt(client->multi_, CURLMOPT_MAX_TOTAL_CONNECTIONS, kMaxConnections);
  curl_multi_setopt(client->multi_, CURLMOPT_MAX_HOST_CONNECTIONS, kMaxConnections);
  client->thread_ = std::thread([c = client.get()] { c->run(); });
  return client;
}

CurlClient::~CurlClient() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  if (thread_.joinable()) {
    curl_multi_wakeup(multi_);
    thread_.join();
  }
  for (auto& t : active_) {
    curl_multi_remove_handle(multi_, t->easy);
  }
  active_.clear();
  queued_.clear();
  if (multi_ != nullptr) {
    curl_multi_cleanup(multi_);
  }
}

// QEMU's curl_init_state: the settings every request shares.
CURL* CurlClient::new_handle(char* error_buffer) const {
  CURL* easy = curl_easy_init();
  if (easy == nullptr) {
    return nullptr;
  }
  curl_easy_setopt(easy, CURLOPT_URL, config_.url.c_str());
  curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, config_.verify_peer ? 1L : 0L);
  curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, config_.verify_peer ? 2L : 0L);
  if (config_.cookie) {
    curl_easy_setopt(easy, CURLOPT_COOKIE, config_.cookie->c_str());
  }
  curl_easy_setopt(easy, CURLOPT_TIMEOUT, static_cast<long>(config_.timeout_seconds));
  curl_easy_setopt(easy, CURLOPT_AUTOREFERER, 1L);
  curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, error_buffer);
  curl_easy_setopt(easy, CURLOPT_FAILONERROR, 1L);
  // libcurl's largest receive buffer: with its 16 KiB default one transfer over loopback ran at
  // half the speed (about 380 against 760 MiB/s).
  curl_easy_setopt(easy, CURLOPT_BUFFERSIZE, 512L * 1024);
  // Only the web protocols, also across redirects (QEMU's answer to CVE-2013-0249).
  curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  if (config_.username) {
    curl_easy_setopt(easy, CURLOPT_USERNAME, config_.username->c_str());
  }
  if (config_.password) {
    curl_easy_setopt(easy, CURLOPT_PASSWORD, config_.password->c_str());
  }
  if (config_.proxy_username) {
    curl_easy_setopt(easy, CURLOPT_PROXYUSERNAME, config_.proxy_username->c_str());
  }
  if (config_.proxy_password) {
    curl_easy_setopt(easy, CURLOPT_PROXYPASSWORD, config_.proxy_password->c_str());
  }
  return easy;
}

Result<uint64_t> CurlClient::probe_length() {
  char error_buffer[CURL_ERROR_SIZE] = {};
  CURL* easy = new_handle(error_buffer);
  if (easy == nullptr) {
    return Error(ErrorKind::kIo, "CURL: Error opening file: out of memory", EIO);
  }
  bool accepts_ranges = false;
  curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, &on_probe_header);
  curl_easy_setopt(easy, CURLOPT_HEADERDATA, &accepts_ranges);
  const CURLcode code = curl_easy_perform(easy);
  curl_off_t length = -1;
  std::string failure;
  if (code != CURLE_OK) {
    failure = curl_message(code, error_buffer);
  } else if (curl_easy_getinfo(easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length) != CURLE_OK ||
             length < 0) {
    failure = "Server didn't report file size.";
  } else if (!accepts_ranges) {
    failure = kNoRanges;
  }
  curl_easy_cleanup(easy);
  if (!failure.empty()) {
    return Error(ErrorKind::kIo, "CURL: Error opening file: " + failure, EIO);
  }
  return static_cast<uint64_t>(length);
}

void CurlClient::fetch(ByteRange range, FetchDone done) {
  auto t = std::make_unique<Transfer>();
  t->range = range;
  t->done = std::move(done);
  {
    std::lock_guard lock(mutex_);
    queued_.push_back(std::move(t));
  }
  curl_multi_wakeup(multi_);
}

void CurlClient::start_queued() {
  std::vector<std::unique_ptr<Transfer>> incoming;
  {
    std::lock_guard lock(mutex_);
    incoming.swap(queued_);
  }
  for (auto& t : incoming) {
    t->easy = new_handle(t->error_buffer);
    if (t->easy == nullptr) {
      t->done({TransferOutcome::kTransient, "curl: out of memory", {}});
      continue;
    }
    t->body.reserve(t->range.size());
    t->range_header = std::to_string(t->range.begin) + "-" + std::to_string(t->range.end - 1);
    curl_easy_setopt(t->easy, CURLOPT_RANGE, t->range_header.c_str());
    curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, &Transfer::on_body);
    curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t.get());
    curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t.get());
    curl_multi_add_handle(multi_, t->easy);
    active_.push_back(std::move(t));
  }
}

void CurlClient::finish(CURL* easy, CURLcode code) {
  auto it = std::find_if(active_.begin(), active_.end(),
                         [easy](const auto& t) { return t->easy == easy; });
  if (it == active_.end()) {
    return;
  }
  std::unique_ptr<Transfer> t = std::move(*it);
  active_.erase(it);
  curl_multi_remove_handle(multi_, easy);
  long status = 0;
  curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
  FetchResult result;
  if (t->ranges_refused) {
    result = {TransferOutcome::kFatal, std::string(kNoRanges), {}};
  } else if (t->overflow) {
    result = {TransferOutcome::kFatal,
              "Server sent more than the " + std::to_string(t->range.size()) + " bytes of range " +
                  t->range_header,
              {}};
  } else if (code != CURLE_OK) {
    result = {classify_transfer(code, status), curl_message(code, t->error_buffer), {}};
  } else if (t->body.size() != t->range.size()) {
    result = {TransferOutcome::kTransient,
              "Server sent " + std::to_string(t->body.size()) + " bytes of the " +
                  std::to_string(t->range.size()) + " of range " + t->range_header,
              {}};
  } else {
    result.body = std::move(t->body);
  }
  t->done(std::move(result));
}

void CurlClient::run() {
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) {
        return;
      }
    }
    start_queued();
    int running = 0;
    curl_multi_perform(multi_, &running);
    int left = 0;
    while (CURLMsg* message = curl_multi_info_read(multi_, &left)) {
      if (message->msg == CURLMSG_DONE) {
        finish(message->easy_handle, message->data.result);
      }
    }
    // Wakes for socket activity, libcurl's own timers, fetch() and the destructor.
    curl_multi_poll(multi_, nullptr, 0, 1000, nullptr);
  }
}

}  // namespace strata::block::http
