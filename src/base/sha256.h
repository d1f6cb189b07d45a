#pragma once
// SHA-256 (FIPS 180-4) of a byte string, as lowercase hex: what QEMU's
// x-debug-block-dirty-bitmap-sha256 reports (qcrypto_hash_digest with QCRYPTO_HASH_ALGO_SHA256).

#include <cstdint>
#include <span>
#include <string>

namespace strata {

std::string sha256_hex(std::span<const uint8_t> data);

}  // namespace strata
