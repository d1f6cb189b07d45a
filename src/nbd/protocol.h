#pragma once
// NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): magic numbers, option, reply, command
// and flag values, and bounded big-endian encoding helpers. Values are the spec's; names follow
// the spec without the NBD_ prefix.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace strata::nbd {

// ---- handshake -----------------------------------------------------------------------------
inline constexpr uint64_t kInitMagic = 0x4e42444d41474943ull;  // "NBDMAGIC"
inline constexpr uint64_t kOptMagic = 0x49484156454f5054ull;   // "IHAVEOPT"
inline constexpr uint64_t kRepMagic = 0x0003e889045565a9ull;   // option reply magic

// Server handshake flags (u16) and client flags (u32).
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientNoZeroes = 1u << 1;

enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptPeekExport = 4,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

inline constexpr uint32_t kRepErrorBit = 1u << 31;
enum Reply : uint32_t {
  kRepAck = 1,
  kRepServer = 2,
  kRepInfo = 3,
  kRepMetaContext = 4,
  kRepErrUnsup = kRepErrorBit | 1,
  kRepErrPolicy = kRepErrorBit | 2,
  kRepErrInvalid = kRepErrorBit | 3,
  kRepErrPlatform = kRepErrorBit | 4,
  kRepErrTlsReqd = kRepErrorBit | 5,
  kRepErrUnknown = kRepErrorBit | 6,
  kRepErrShutdown = kRepErrorBit | 7,
  kRepErrBlockSizeReqd = kRepErrorBit | 8,
  kRepErrTooBig = kRepErrorBit | 9,
  kRepErrExtHeaderReqd = kRepErrorBit | 10,
};

enum Info : uint16_t {
  kInfoExport = 0,
  kInfoName = 1,
  kInfoDescription = 2,
  kInfoBlockSize = 3,
};

// Transmission flags (u16), sent with the export size.
enum TransmissionFlags : uint16_t {
  kFlagHasFlags = 1u << 0,
  kFlagReadOnly = 1u << 1,
  kFlagSendFlush = 1u << 2,
  kFlagSendFua = 1u << 3,
  kFlagRotational = 1u << 4,
  kFlagSendTrim = 1u << 5,
  kFlagSendWriteZeroes = 1u << 6,
  kFlagSendDf = 1u << 7,
  kFlagCanMultiConn = 1u << 8,
  kFlagSendResize = 1u << 9,
  kFlagSendCache = 1u << 10,
  kFlagSendFastZero = 1u << 11,
  kFlagBlockStatusPayload = 1u << 12,
};

// ---- transmission --------------------------------------------------------------------------
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kExtendedRequestMagic = 0x21e41c71;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr uint32_t kExtendedReplyMagic = 0x6e8a278c;
inline constexpr size_t kRequestSize = 28;
inline constexpr size_t kExtendedRequestSize = 32;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
  kCmdResize = 8,
};

enum CommandFlags : uint16_t {
  kCmdFlagFua = 1u << 0,
  kCmdFlagNoHole = 1u << 1,
  kCmdFlagDf = 1u << 2,
  kCmdFlagReqOne = 1u << 3,
  kCmdFlagFastZero = 1u << 4,
  kCmdFlagPayloadLen = 1u << 5,
};

inline constexpr uint16_t kReplyFlagDone = 1u << 0;
enum ChunkType : uint16_t {
  kChunkNone = 0,
  kChunkOffsetData = 1,
  kChunkOffsetHole = 2,
  kChunkBlockStatus = 5,
  kChunkBlockStatusExt = 6,
  kChunkError = (1u << 15) | 1,
  kChunkErrorOffset = (1u << 15) | 2,
};

// Error values on the wire (not the host's errno numbering, though equal on Linux).
enum WireError : uint32_t {
  kEperm = 1,
  kEio = 5,
  kEnomem = 12,
  kEinval = 22,
  kEnospc = 28,
  kEoverflow = 75,
  kEnotsup = 95,
  kEshutdown = 108,
};

// base:allocation flags; qemu:allocation-depth values are the depth itself.
inline constexpr uint32_t kStateHole = 1u << 0;
inline constexpr uint32_t kStateZero = 1u << 1;
// qemu:dirty-bitmap contexts (QEMU's NBD_STATE_DIRTY).
inline constexpr uint32_t kStateDirty = 1u << 0;

// ---- limits --------------------------------------------------------------------------------
// Largest READ/WRITE/CACHE payload and largest option payload (QEMU's NBD_MAX_BUFFER_SIZE).
inline constexpr uint32_t kMaxBufferSize = 32u << 20;
// Longest name or description on the wire (the spec's MUST; QEMU's NBD_MAX_STRING_SIZE).
inline constexpr uint32_t kMaxStringSize = 4096;
// Most extents in one BLOCK_STATUS chunk (QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS: 1 MiB of them).
inline constexpr uint32_t kMaxBlockStatusExtents = (1u << 20) / 8;

// Maps a host errno to the NBD wire error (QEMU's system_errno_to_nbd_errno).
uint32_t wire_error(int host_errno);
// Name of an option in messages, as QEMU's nbd_opt_lookup spells it ("go", "set meta context").
const char* option_name(uint32_t option);
// QEMU's nbd_rep_lookup names ("ack", "server", ...) for option reply types.
const char* reply_name(uint32_t reply_type);
const char* command_name(uint16_t command);

// ---- encoding ------------------------------------------------------------------------------
// Appends big-endian values to a byte string.
class WireWriter {
 public:
  explicit WireWriter(std::string& out) : out_(out) {}
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u16(uint16_t v) {
    u8(static_cast<uint8_t>(v >> 8));
    u8(static_cast<uint8_t>(v));
  }
  void u32(uint32_t v) {
    u16(static_cast<uint16_t>(v >> 16));
    u16(static_cast<uint16_t>(v));
  }
  void u64(uint64_t v) {
    u32(static_cast<uint32_t>(v >> 32));
    u32(static_cast<uint32_t>(v));
  }
  void bytes(std::string_view s) { out_.append(s); }

 private:
  std::string& out_;
};

// Reads big-endian values from a bounded byte range. A read past the end sets failed() and
// returns zeroes; callers check failed() once after a group of reads.
class WireReader {
 public:
  WireReader(const void* data, size_t size)
      : data_(static_cast<const uint8_t*>(data)), size_(size) {}
  uint8_t u8() { return static_cast<uint8_t>(big_endian(1)); }
  uint16_t u16() { return static_cast<uint16_t>(big_endian(2)); }
  uint32_t u32() { return static_cast<uint32_t>(big_endian(4)); }
  uint64_t u64() { return big_endian(8); }
  // Up to `length` bytes as a string; fails (returning "") if fewer remain.
  std::string bytes(size_t length) {
    if (!take(length)) {
      return {};
    }
    return std::string(reinterpret_cast<const char*>(data_ + pos_ - length), length);
  }
  size_t remaining() const { return size_ - pos_; }
  bool failed() const { return failed_; }

 private:
  // The next `width` bytes as a big-endian number; 0 (and failed()) if fewer remain.
  uint64_t big_endian(size_t width) {
    if (!take(width)) {
      return 0;
    }
    uint64_t value = 0;
    for (size_t i = pos_ - width; i < pos_; ++i) {
      value = (value << 8) | data_[i];
    }
    return value;
  }
  bool take(size_t n) {
    if (failed_ || n > size_ - pos_) {
      failed_ = true;
      return false;
    }
    pos_ += n;
    return true;
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  bool failed_ = false;
};

}  // namespace strata::nbd
