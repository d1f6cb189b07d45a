// The http driver's reading of response headers (src/block/drivers/http/curl_transfer.h): which
// Accept-Ranges lines let it read byte ranges, as QEMU's curl_header_cb decides.

#include <gtest/gtest.h>

#include "block/drivers/http/curl_transfer.h"

namespace strata::block::http {
namespace {

TEST(HttpHeaderTest, AcceptRangesBytesInAnyCase) {
  EXPECT_TRUE(header_accepts_byte_ranges("Accept-Ranges: bytes\r\n"));
  EXPECT_TRUE(header_accepts_byte_ranges("accept-ranges:bytes\r\n"));
  EXPECT_TRUE(header_accepts_byte_ranges("ACCEPT-RANGES: \t BYTES\r\n"));
  EXPECT_TRUE(header_accepts_byte_ranges("Accept-Ranges: bytes"));
}

TEST(HttpHeaderTest, OtherValuesAndHeadersDoNot) {
  EXPECT_FALSE(header_accepts_byte_ranges("Accept-Ranges: none\r\n"));
  EXPECT_FALSE(header_accepts_byte_ranges("Accept-Ranges: bytesx\r\n"));
  EXPECT_FALSE(header_accepts_byte_ranges("Accept-Ranges:\r\n"));
  EXPECT_FALSE(header_accepts_byte_ranges("Content-Length: 4096\r\n"));
  EXPECT_FALSE(header_accepts_byte_ranges("X-Accept-Ranges: bytes\r\n"));
  EXPECT_FALSE(header_accepts_byte_ranges(""));
  EXPECT_FALSE(header_accepts_byte_ranges("Accept"));
}

}  // namespace
}  // namespace strata::block::http
