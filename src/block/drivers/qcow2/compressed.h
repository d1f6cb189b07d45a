#pragma once
// Decompression of compressed clusters (qcow2.rst "Compressed Clusters Descriptor"): zlib as raw
// deflate with a 4 KiB window (QEMU's qcow2_zlib_decompress) or zstd frames.

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "base/result.h"

namespace strata::block::qcow2 {

// Decompresses `input` into exactly `output.size()` bytes (one cluster). The input may carry
// trailing bytes (compressed data is stored in whole sectors). Fails with kCorrupt/EIO when the
// data does not decompress to a full cluster.
Result<void> decompress(uint8_t compression_type, std::span<const uint8_t> input,
                        std::span<uint8_t> output);

// Compresses one cluster the way QEMU's qcow2_co_compress does (zlib: raw deflate, default level,
// window bits 12, memLevel 9; zstd: one frame at the default level). Returns the compressed bytes
// when they are strictly smaller than `input` (at most input.size() - 1 bytes), nullopt when the
// data does not compress (the caller then writes the cluster uncompressed), and an error when the
// library fails. Thread-safe: runs on the compression thread pool.
Result<std::optional<std::vector<uint8_t>>> compress(uint8_t compression_type,
                                                     std::span<const uint8_t> input);

}  // namespace strata::block::qcow2
