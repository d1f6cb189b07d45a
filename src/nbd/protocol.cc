#include "nbd/protocol.h"

#include <cerrno>

namespace strata::nbd {

uint32_t wire_error(int host_errno) {
  switch (host_errno) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
      return kEperm;
    case EIO:
      return kEio;
    case ENOMEM:
      return kEnomem;
    case EDQUOT:
    case EFBIG:
    case ENOSPC:
      return kEnospc;
    case EOVERFLOW:
      return kEoverflow;
    case ENOTSUP:
      return kEnotsup;
    case ESHUTDOWN:
      return kEshutdown;
    case EINVAL:
    default:
      return kEinval;
  }
}

const char* option_name(uint32_t option) {
  switch (option) {
    case kOptExportName:
      return "export name";
    case kOptAbort:
      return "abort";
    case kOptList:
      return "list";
    case kOptPeekExport:
      return "peek export";
    case kOptStartTls:
      return "starttls";
    case kOptInfo:
      return "info";
    case kOptGo:
      return "go";
    case kOptStructuredReply:
      return "structured reply";
    case kOptListMetaContext:
      return "list meta context";
    case kOptSetMetaContext:
      return "set meta context";
    case kOptExtendedHeaders:
      return "extended headers";
    default:
      return "<unknown>";
  }
}

const char* reply_name(uint32_t reply_type) {
  switch (reply_type) {
    case kRepAck:
      return "ack";
    case kRepServer:
      return "server";
    case kRepInfo:
      return "info";
    case kRepMetaContext:
      return "meta context";
    case kRepErrUnsup:
      return "unsupported";
    case kRepErrPolicy:
      return "denied by policy";
    case kRepErrInvalid:
      return "invalid";
    case kRepErrPlatform:
      return "platform lacks support";
    case kRepErrTlsReqd:
      return "TLS required";
    case kRepErrUnknown:
      return "export unknown";
    case kRepErrShutdown:
      return "server shutting down";
    case kRepErrBlockSizeReqd:
      return "block size required";
    case kRepErrTooBig:
      return "option payload too big";
    case kRepErrExtHeaderReqd:
      return "extended headers required";
    default:
      return "<unknown>";
  }
}

const char* command_name(uint16_t command) {
  switch (command) {
    case kCmdRead:
      return "read";
    case kCmdWrite:
      return "write";
    case kCmdDisc:
      return "disconnect";
    case kCmdFlush:
      return "flush";
    case kCmdTrim:
      return "trim";
    case kCmdCache:
      return "cache";
    case kCmdWriteZeroes:
      return "write zeroes";
    case kCmdBlockStatus:
      return "block status";
    case kCmdResize:
      return "resize";
    default:
      return "<unknown>";
  }
}

}  // namespace strata::nbd
