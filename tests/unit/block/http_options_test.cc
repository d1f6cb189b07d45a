// The http and https drivers' option checks (QEMU's curl_open texts and order), the filename
// rules, remote URL detection, and the classification of transfer failures for retries.

#include <gtest/gtest.h>

#include "block/drivers/http/curl_client.h"
#include "block/drivers/http/http_options.h"
#include "block/drivers/remote_url.h"

namespace strata::block::http {
namespace {

HttpOptions parse(const nlohmann::json& json, std::string_view scheme = "http") {
  ArgDecoder d(json);
  HttpOptions options = parse_http_options(d, scheme);
  EXPECT_TRUE(d.finish().ok());
  return options;
}

std::string check_error(const nlohmann::json& json, std::string_view scheme = "http") {
  auto checked = check_http_options(parse(json, scheme));
  return checked ? "" : checked.error().message();
}

TEST(HttpOptionsTest, DefaultsAreQemus) {
  auto options = parse({{"url", "http://h/x"}});
  EXPECT_EQ(options.readahead_bytes(), 256u * 1024);
  EXPECT_EQ(options.timeout_seconds(), 5u);
  EXPECT_TRUE(options.verify_peer());
  EXPECT_EQ(check_error({{"url", "http://h/x"}}), "");
}

TEST(HttpOptionsTest, ChecksInQemusOrderWithItsTexts) {
  EXPECT_EQ(check_error({{"url", "http://h/x"}, {"readahead", 1000}}),
            "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512");
  EXPECT_EQ(check_error({{"url", "http://h/x"}, {"readahead", -512}}),
            "Value '-512' is out of range for parameter 'readahead'");
  EXPECT_EQ(check_error({{"url", "https://h/x"}, {"readahead", 1000}, {"timeout", -1}}),
            "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512");
  EXPECT_EQ(check_error({{"url", "http://h/x"}, {"timeout", 10001}}),
            "timeout parameter is too large or negative");
  EXPECT_EQ(check_error({{"url", "http://h/x"}, {"timeout", -1}}),
            "timeout parameter is too large or negative");
  EXPECT_EQ(check_error({{"url", "http://h/x"}, {"timeout", 10000}, {"readahead", 0}}), "");
  EXPECT_EQ(check_error({{"url", "http://h/x"}, {"cookie", "a=b"}, {"cookie-secret", "s"}}),
            "curl driver cannot handle both cookie and cookie secret");
  EXPECT_EQ(check_error({{"url", "https://h/x"}}),
            "http curl driver cannot handle the URL 'https://h/x' (does not start with "
            "'http://')");
  EXPECT_EQ(check_error({{"url", "HTTPS://h/x"}}, "https"),
            "https curl driver cannot handle the URL 'HTTPS://h/x' (does not start with "
            "'https://')");
}

TEST(HttpOptionsTest, SslverifyBelongsToHttpsOnly) {
  const nlohmann::json json = {{"url", "http://h/x"}, {"sslverify", false}};
  ArgDecoder d(json);
  (void)parse_http_options(d, "http");
  auto finished = d.finish();
  ASSERT_FALSE(finished.ok());
  EXPECT_EQ(finished.error().message(), "Parameter 'sslverify' is unexpected");
  EXPECT_FALSE(parse({{"url", "https://h/x"}, {"sslverify", false}}, "https").verify_peer());
}

TEST(HttpOptionsTest, UrlNamesTheNodeOnlyWithoutCredentialsOrCookies) {
  EXPECT_TRUE(url_names_node(parse({{"url", "http://h/x"}, {"readahead", 512}, {"timeout", 9}})));
  EXPECT_TRUE(url_names_node(parse({{"url", "https://h/x"}, {"sslverify", true}}, "https")));
  EXPECT_FALSE(url_names_node(parse({{"url", "https://h/x"}, {"sslverify", false}}, "https")));
  EXPECT_FALSE(url_names_node(parse({{"url", "http://h/x"}, {"cookie", "a=b"}})));
  EXPECT_FALSE(url_names_node(parse({{"url", "http://h/x"}, {"proxy-username", "p"}})));
  auto strong = strong_http_options(
      parse({{"url", "http://h/x"}, {"proxy-username", "p"}, {"readahead", 512}}));
  EXPECT_EQ(strong, (nlohmann::json{{"url", "http://h/x"}, {"proxy-username", "p"}}));
}

TEST(RemoteUrlTest, RecognisesHttpAndNbdUrlsOnly) {
  EXPECT_TRUE(is_http_url("http://h/x"));
  EXPECT_TRUE(is_http_url("https://h/x"));
  EXPECT_FALSE(is_http_url("HTTP://h/x"));
  EXPECT_FALSE(is_http_url("ftp://h/x"));
  EXPECT_TRUE(is_remote_url("nbd://localhost/e"));
  EXPECT_TRUE(is_remote_url("nbd+unix:///e?socket=/tmp/s"));
  EXPECT_FALSE(is_remote_url("nbd:localhost:10809"));
  EXPECT_FALSE(is_remote_url("json:{\"driver\":\"http\"}"));
  EXPECT_FALSE(is_remote_url("base.qcow2"));
  EXPECT_FALSE(is_remote_url("dir/http://x"));
}

TEST(RemoteUrlTest, AbsolutePathsAndUrlsAreNotCombinedWithTheImagesDirectory) {
  EXPECT_TRUE(names_itself("/images/base.qcow2"));
  EXPECT_TRUE(names_itself("http://h/base.raw"));
  EXPECT_TRUE(names_itself("nbd+unix:///?socket=/tmp/s"));
  EXPECT_FALSE(names_itself("base.qcow2"));
  EXPECT_FALSE(names_itself("json:{}"));
  EXPECT_FALSE(names_itself(""));
}

TEST(RemoteUrlTest, OptionsNameTheProtocolDriver) {
  auto http = remote_url_options("https://h:8443/a/b.img");
  ASSERT_TRUE(http.ok());
  EXPECT_EQ(*http, (nlohmann::json{{"driver", "https"}, {"url", "https://h:8443/a/b.img"}}));
  auto nbd = remote_url_options("nbd+unix:///exp?socket=/tmp/s.sock");
  ASSERT_TRUE(nbd.ok());
  EXPECT_EQ((*nbd)["driver"], "nbd");
  EXPECT_EQ((*nbd)["export"], "exp");
  EXPECT_FALSE(remote_url_options("nbds://h/e").ok());  // needs credentials
}

TEST(CurlClientTest, AcceptRangesHeaderIsMatchedLikeQemuWithoutCase) {
  EXPECT_TRUE(accepts_byte_ranges("Accept-Ranges: bytes\r\n"));
  EXPECT_TRUE(accepts_byte_ranges("accept-ranges:bytes\r\n"));
  EXPECT_TRUE(accepts_byte_ranges("ACCEPT-RANGES: \tBytes \r\n"));
  EXPECT_FALSE(accepts_byte_ranges("Accept-Ranges: none\r\n"));
  EXPECT_FALSE(accepts_byte_ranges("X-Accept-Ranges: bytes\r\n"));
  EXPECT_FALSE(accepts_byte_ranges("Accept-Ranges bytes\r\n"));
  EXPECT_FALSE(accepts_byte_ranges(""));
}

TEST(CurlClientTest, OnlyPassingFailuresAreRetried) {
  EXPECT_EQ(classify_transfer(CURLE_OK, 206), TransferOutcome::kOk);
  EXPECT_EQ(classify_transfer(CURLE_COULDNT_CONNECT, 0), TransferOutcome::kTransient);
  EXPECT_EQ(classify_transfer(CURLE_PARTIAL_FILE, 206), TransferOutcome::kTransient);
  EXPECT_EQ(classify_transfer(CURLE_OPERATION_TIMEDOUT, 0), TransferOutcome::kTransient);
  EXPECT_EQ(classify_transfer(CURLE_HTTP_RETURNED_ERROR, 503), TransferOutcome::kTransient);
  EXPECT_EQ(classify_transfer(CURLE_HTTP_RETURNED_ERROR, 429), TransferOutcome::kTransient);
  EXPECT_EQ(classify_transfer(CURLE_HTTP_RETURNED_ERROR, 404), TransferOutcome::kFatal);
  EXPECT_EQ(classify_transfer(CURLE_PEER_FAILED_VERIFICATION, 0), TransferOutcome::kFatal);
}

}  // namespace
}  // namespace strata::block::http
