#include "block/drivers/remote_url.h"

#include <string>

#include "block/drivers/nbd/nbd_uri.h"

namespace strata::block {

bool is_http_url(std::string_view name) {
  return name.starts_with("http://") || name.starts_with("https://");
}

bool is_remote_url(std::string_view name) {
  return is_http_url(name) || is_nbd_uri(name);
}

bool names_itself(std::string_view backing_name) {
  return backing_name.starts_with('/') || is_remote_url(backing_name);
}

Result<nlohmann::json> remote_url_options(std::string_view url) {
  if (is_http_url(url)) {
    const std::string_view scheme = url.substr(0, url.find(':'));
    return nlohmann::json{{"driver", scheme}, {"url", url}};
  }
  return nbd_uri_options(url);
}

}  // namespace strata::block
