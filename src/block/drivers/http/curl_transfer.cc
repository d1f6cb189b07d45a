#include "block/drivers/http/curl_transfer.h"

#include <curl/curl.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string_view>
#include <thread>

namespace strata::block::http {

namespace {

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// The calling thread's easy handle, reset for a new transfer.
CURL* thread_handle() {
  struct Handle {
    CURL* curl = nullptr;
    ~Handle() {
      if (curl != nullptr) {
        curl_easy_cleanup(curl);
      }
    }
  };
  thread_local Handle handle;
  global_init();
  if (handle.curl == nullptr) {
    handle.curl = curl_easy_init();
  } else {
    curl_easy_reset(handle.curl);
  }
  return handle.curl;
}

void apply(CURL* curl, const CurlSettings& settings, char* error_buffer) {
  curl_easy_setopt(curl, CURLOPT_URL, settings.url.c_str());
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error_buffer);
  curl_easy_setopt(curl, CURLOPT_FAILONERROR, 1L);
  curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, static_cast<long>(settings.timeout_seconds));
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, settings.ssl_verify ? 1L : 0L);
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, settings.ssl_verify ? 2L : 0L);
  if (settings.cookie) {
    curl_easy_setopt(curl, CURLOPT_COOKIE, settings.cookie->c_str());
  }
  if (settings.username) {
    curl_easy_setopt(curl, CURLOPT_USERNAME, settings.username->c_str());
  }
  if (settings.proxy_username) {
    curl_easy_setopt(curl, CURLOPT_PROXYUSERNAME, settings.proxy_username->c_str());
  }
}

// The message of a failed transfer: libcurl's buffer, else its code's text.
std::string curl_message(CURLcode code, const char* error_buffer) {
  return error_buffer[0] != '\0' ? error_buffer : curl_easy_strerror(code);
}

bool ascii_iequals_prefix(std::string_view line, std::string_view prefix) {
  if (line.size() < prefix.size()) {
    return false;
  }
  for (size_t i = 0; i < prefix.size(); ++i) {
    char a = line[i];
    if (a >= 'A' && a <= 'Z') {
      a = static_cast<char>(a - 'A' + 'a');
    }
    if (a != prefix[i]) {
      return false;
    }
  }
  return true;
}

size_t header_callback(char* data, size_t size, size_t count, void* opaque) {
  if (header_accepts_byte_ranges(std::string_view(data, size * count))) {
    *static_cast<bool*>(opaque) = true;
  }
  return size * count;
}

struct Sink {
  char* out;
  uint64_t capacity;
  uint64_t received = 0;
};

size_t write_callback(char* data, size_t size, size_t count, void* opaque) {
  auto* sink = static_cast<Sink*>(opaque);
  const uint64_t bytes = size * count;
  if (bytes > sink->capacity - sink->received) {
    return 0;  // more than was asked for: abort the transfer
  }
  std::memcpy(sink->out + sink->received, data, bytes);
  sink->received += bytes;
  return bytes;
}

}  // namespace

bool header_accepts_byte_ranges(std::string_view line) {
  if (!ascii_iequals_prefix(line, "accept-ranges:")) {
    return false;
  }
  std::string_view value = line.substr(14);
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) {
    value.remove_prefix(1);
  }
  if (!ascii_iequals_prefix(value, "bytes")) {
    return false;
  }
  std::string_view rest = value.substr(5);
  return rest.empty() || rest.front() == '\r' || rest.front() == '\n' || rest.front() == ' ' ||
         rest.front() == '\t';
}

Result<uint64_t> probe_length(const CurlSettings& settings) {
  CURL* curl = thread_handle();
  if (curl == nullptr) {
    return make_error(ErrorKind::kIo, "CURL: Error opening file: curl_easy_init failed");
  }
  char error_buffer[CURL_ERROR_SIZE] = {0};
  apply(curl, settings, error_buffer);
  bool accepts_ranges = false;
  curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, &header_callback);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &accepts_ranges);
  const CURLcode code = curl_easy_perform(curl);
  if (code != CURLE_OK) {
    return make_error(ErrorKind::kIo,
                      "CURL: Error opening file: " + curl_message(code, error_buffer));
  }
  curl_off_t length = -1;
  if (curl_easy_getinfo(curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length) != CURLE_OK ||
      length < 0) {
    return make_error(ErrorKind::kIo, "CURL: Error opening file: Server didn't report file size.");
  }
  if (!accepts_ranges) {
    return make_error(ErrorKind::kIo,
                      "CURL: Error opening file: Server does not support 'range' (byte ranges).");
  }
  return static_cast<uint64_t>(length);
}

Result<void> fetch_range(const CurlSettings& settings, uint64_t offset, uint64_t length, char* out,
                         int retries) {
  std::string last_error;
  for (int attempt = 0; attempt <= retries; ++attempt) {
    if (attempt > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100 * attempt));
    }
    CURL* curl = thread_handle();
    if (curl == nullptr) {
      last_error = "curl_easy_init failed";
      continue;
    }
    char error_buffer[CURL_ERROR_SIZE] = {0};
    apply(curl, settings, error_buffer);
    const std::string range = std::to_string(offset) + "-" + std::to_string(offset + length - 1);
    curl_easy_setopt(curl, CURLOPT_RANGE, range.c_str());
    Sink sink{out, length};
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &write_callback);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &sink);
    const CURLcode code = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    if (code == CURLE_OK && sink.received == length && (status == 206 || offset == 0)) {
      return ok();
    }
    last_error = code != CURLE_OK ? curl_message(code, error_buffer)
                                  : "short or unranged reply (HTTP " + std::to_string(status) +
                                        ", " + std::to_string(sink.received) + " bytes)";
  }
  return Error::from_errno(EIO, "HTTP read of " + settings.url + " failed: " + last_error);
}

}  // namespace strata::block::http
