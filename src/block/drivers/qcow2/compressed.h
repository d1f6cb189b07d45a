#pragma once
// Decompression of compressed clusters (qcow2.rst "Compressed Clusters Descriptor"): zlib as raw
// deflate with a 4 KiB window (QEMU's qcow2_zlib_decompress) or zstd frames.

#include <cstdint>
#include <span>

#include "base/result.h"

namespace strata::block::qcow2 {

// Decompresses `input` into exactly `output.size()` bytes (one cluster). The input may carry
// trailing bytes (compressed data is stored in whole sectors). Fails with kCorrupt/EIO when the
// data does not decompress to a full cluster.
Result<void> decompress(uint8_t compression_type, std::span<const uint8_t> input,
                        std::span<uint8_t> output);

}  // namespace strata::block::qcow2
