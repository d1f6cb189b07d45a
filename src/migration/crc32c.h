#pragma once
// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF):
// the checksum of every header, record and section of a strata migration stream
// (docs/migration-format.md "Integrity"). Uses the SSE 4.2 crc32 instruction when the CPU has it.

#include <cstdint>
#include <span>

namespace strata::migration {

// Extends `crc` (the value a previous call returned, or 0 to start) with `data`: crc32c(a ++ b) ==
// crc32c_extend(crc32c_extend(0, a), b).
uint32_t crc32c_extend(uint32_t crc, std::span<const uint8_t> data);

inline uint32_t crc32c(std::span<const uint8_t> data) {
  return crc32c_extend(0, data);
}

}  // namespace strata::migration
