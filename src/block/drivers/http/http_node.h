#pragma once
// The `http` and `https` drivers (QEMU's block/curl.c): a read-only protocol node whose data is a
// resource on a web server that honours byte ranges, such as a base image on a remote origin that
// a local overlay streams in.
//
// Options are QEMU's BlockdevOptionsCurlHttp(s): url (must start with the driver's scheme),
// readahead (bytes fetched past each read, default 256 KiB, a multiple of 512), timeout (seconds
// per transfer, default 5, at most 10000; 0: none), cookie, username, proxy-username, and for
// https sslverify (default true). cookie-secret, password-secret and proxy-password-secret name
// `secret` objects, which strata does not have: naming one fails as QEMU fails for a missing
// secret. Opening read-write fails ("curl driver does not support writes") unless auto-read-only
// makes the node read-only.
//
// Reads: the length comes from a HEAD request at open. A read inside one of the last eight
// fetched ranges is served from memory; any other read fetches itself plus `readahead` bytes with
// a ranged GET on a worker thread (several reads are in flight at once), retried three times
// before the read fails with EIO.

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "block/drivers/driver.h"
#include "block/drivers/http/curl_transfer.h"

namespace strata::block {

struct HttpOptions : DriverOptions {
  bool https = false;
  std::string url;
  uint64_t readahead = 256 * 1024;
  int64_t timeout = 5;
  bool ssl_verify = true;
  std::optional<std::string> cookie;
  std::optional<std::string> username;
  std::optional<std::string> proxy_username;
  // Secret object ids (none can exist in strata; naming one is an error at open).
  std::optional<std::string> cookie_secret;
  std::optional<std::string> password_secret;
  std::optional<std::string> proxy_password_secret;
};

class HttpNode final : public Node {
 public:
  static std::unique_ptr<DriverOptions> parse_http(ArgDecoder& d);
  static std::unique_ptr<DriverOptions> parse_https(ArgDecoder& d);
  static Result<std::shared_ptr<Node>> open(OpenContext& context, const BlockdevOptions& options);

  HttpNode(CommonOptions common, bool https, http::CurlSettings settings, uint64_t readahead,
           uint64_t length);

  const char* driver_name() const override { return https_ ? "https" : "http"; }
  std::optional<std::string> exact_filename() const override { return settings_.url; }
  uint64_t length() const override { return length_; }
  std::optional<uint64_t> allocated_size() const override { return std::nullopt; }

  aio::Task<Result<void>> co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                    uint32_t flags) override;

 private:
  // A fetched range kept for later reads (QEMU's CURLState buffers).
  struct Cached {
    uint64_t offset = 0;
    std::shared_ptr<const std::vector<char>> data;
  };
  // Copies [offset, offset + bytes) into `qiov` if one cached range holds all of it.
  bool read_cached(uint64_t offset, uint64_t bytes, const IoVector& qiov);
  void remember(uint64_t offset, std::shared_ptr<const std::vector<char>> data);

  bool https_;
  http::CurlSettings settings_;
  uint64_t readahead_;
  uint64_t length_;
  std::vector<Cached> cache_;  // newest last; the node's home loop only
};

}  // namespace strata::block
