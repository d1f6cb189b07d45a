// SHA-256 against the FIPS 180-4 example vectors and padding boundaries.

#include "base/sha256.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace strata {
namespace {

std::string hash_of(const std::string& text) {
  return sha256_hex(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(hash_of(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hash_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hash_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(hash_of(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, EightZeroBytesAsQemuHashesAnEmptySmallBitmap) {
  // What x-debug-block-dirty-bitmap-sha256 reports for a clean bitmap of at most 64 chunks.
  std::vector<uint8_t> zeroes(8, 0);
  EXPECT_EQ(sha256_hex(zeroes), "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc");
}

TEST(Sha256Test, LengthsAroundTheBlockBoundaryDiffer) {
  // 55, 56 and 64 bytes take one, two and two padding blocks.
  EXPECT_NE(hash_of(std::string(55, 'x')), hash_of(std::string(56, 'x')));
  EXPECT_EQ(hash_of(std::string(64, 'a')),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
}

}  // namespace
}  // namespace strata
