// NBD URIs as filenames (block/drivers/nbd/nbd_uri.h): the plain forms QEMU accepts and the
// nbds forms with libnbd's TLS parameters.

#include "block/drivers/nbd/nbd_uri.h"

#include <gtest/gtest.h>

namespace strata::block {
namespace {

TEST(NbdUriTest, PlainUrisGiveServerAndExport) {
  auto tcp = nbd_uri_options("nbd://user@example.org:1234/my%20disk");
  ASSERT_TRUE(tcp.ok());
  EXPECT_EQ((*tcp)["server"]["host"], "example.org");
  EXPECT_EQ((*tcp)["server"]["port"], "1234");
  EXPECT_EQ((*tcp)["export"], "my disk");
  auto unix_socket = nbd_uri_options("nbd+unix:///?socket=/run/a.sock");
  ASSERT_TRUE(unix_socket.ok());
  EXPECT_EQ((*unix_socket)["server"]["path"], "/run/a.sock");
  EXPECT_FALSE(unix_socket->contains("export"));
  for (const char* bad :
       {"nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd:///x", "nbd://h/x?socket=/s",
        "nbd://h/x?tls-certificates=/d", "nbd://h:99999/x", "nbd+unix:///x?socket=/s&bogus=1"}) {
    auto refused = nbd_uri_options(bad);
    ASSERT_FALSE(refused.ok()) << bad;
    EXPECT_EQ(refused.error().message(), "No valid URL specified") << bad;
  }
}

TEST(NbdUriTest, NbdsUrisCarryTheirTlsParameters) {
  std::optional<NbdUriTls> tls;
  auto x509 = nbd_uri_options(
      "nbds+unix:///disk?socket=/s&tls-certificates=/pki%2Fclient&tls-hostname=h&"
      "tls-verify-peer=false",
      &tls);
  ASSERT_TRUE(x509.ok());
  ASSERT_TRUE(tls.has_value());
  EXPECT_EQ(tls->certificates, "/pki/client");
  EXPECT_EQ(tls->hostname, "h");
  EXPECT_FALSE(tls->verify_peer);
  EXPECT_EQ((*x509)["server"]["path"], "/s");

  tls.reset();
  auto psk = nbd_uri_options("nbds://alice@10.0.0.1/disk?tls-psk-file=/k.psk", &tls);
  ASSERT_TRUE(psk.ok());
  ASSERT_TRUE(tls.has_value());
  EXPECT_EQ(tls->psk_file, "/k.psk");
  EXPECT_EQ(tls->username, "alice");
  EXPECT_EQ((*psk)["server"]["host"], "10.0.0.1");

  tls.reset();
  auto plain = nbd_uri_options("nbd://h/disk", &tls);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(tls.has_value());

  auto without_credentials = nbd_uri_options("nbds://h/disk", &tls);
  ASSERT_FALSE(without_credentials.ok());
  EXPECT_NE(without_credentials.error().message().find("needs tls-certificates"),
            std::string::npos);
  EXPECT_FALSE(nbd_uri_options("nbds://h/disk?tls-certificates=/d").ok());  // no TLS wanted
  EXPECT_FALSE(nbd_uri_options("nbds://h/d?tls-certificates=/d&tls-verify-peer=maybe", &tls).ok());
}

}  // namespace
}  // namespace strata::block
