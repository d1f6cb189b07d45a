// `strata nbd` command line: qemu-nbd's options (qemu-nbd.c main), checked in its order with its
// messages and exit code 1. Options of qemu-nbd that strata does not provide (kernel devices,
// listing, TLS, offsets, internal snapshots, tracing) are refused with a clear message rather than
// taken for something else.

#include <getopt.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cli/nbd_cmd_internal.h"
#include "nbd/protocol.h"

namespace strata::cli::nbd_cmd {

namespace {

constexpr const char* kUsage =
    "Usage: strata nbd [OPTIONS] FILE\n"
    "Serve one disk image over NBD, like qemu-nbd.\n"
    "\n"
    "  -h, --help                display this help and exit\n"
    "  -V, --version             output version information and exit\n"
    "\n"
    "Connection properties:\n"
    "  -p, --port=PORT           port to listen on (default `10809')\n"
    "  -b, --bind=IFACE          interface to bind to (default `0.0.0.0')\n"
    "  -k, --socket=PATH         path to the unix socket (absolute)\n"
    "  -e, --shared=NUM          device can be shared by NUM clients (default '1', 0 = unlimited)\n"
    "  -t, --persistent          don't exit on the last connection\n"
    "  -v, --verbose             display extra debugging information\n"
    "  -x, --export-name=NAME    expose export by name (default is empty string)\n"
    "  -D, --description=TEXT    export a human-readable description\n"
    "      --handshake-limit=N   limit client's handshake to N seconds (default 10)\n"
    "\n"
    "Exposing part of the image:\n"
    "  -A, --allocation-depth    expose the allocation depth\n"
    "  -B, --bitmap=NAME         expose a persistent dirty bitmap\n"
    "\n"
    "General purpose options:\n"
    "  --object type,id=ID,...   define an object such as 'iothread'\n"
    "  --fork                    fork off the server process and exit the parent\n"
    "                            once the server is running\n"
    "  --pid-file=PATH           store the server's process ID in the given file\n"
    "\n"
    "Block device options:\n"
    "  -f, --format=FORMAT       set image format (raw, qcow2, ...)\n"
    "  -r, --read-only           export read-only\n"
    "  -s, --snapshot            use FILE as an external snapshot, create a temporary\n"
    "                            file with backing_file=FILE, redirect the write to\n"
    "                            the temporary one\n"
    "  -n, --nocache             disable host cache\n"
    "      --cache=MODE          set cache mode used to access the disk image, the\n"
    "                            valid options are: 'none', 'writeback' (default),\n"
    "                            'writethrough', 'directsync' and 'unsafe'\n"
    "      --aio=MODE            set AIO mode (native, io_uring or threads)\n"
    "      --discard=MODE        set discard mode (ignore, unmap)\n"
    "      --detect-zeroes=MODE  set detect-zeroes mode (off, on, unmap)\n"
    "      --image-opts          treat FILE as a full set of image options\n"
    "\n"
    "Usage: strata nbd -L [OPTIONS]\n"
    "List the exports of an NBD server (its address from -k, or -b and -p).\n"
    "\n"
    "TLS:\n"
    "  --tls-creds=ID            use TLS credentials object ID (endpoint=server, or\n"
    "                            endpoint=client with -L)\n"
    "  --tls-authz=ID            authorize x509 client names with authz object ID\n"
    "  --tls-hostname=NAME       with -L: the name the server certificate must carry\n"
    "\n"
    "Not provided by strata nbd: -c/-d (kernel NBD devices), -o, -l, -T, --selinux-label.\n";

enum LongOption {
  kCache = 256,
  kAio,
  kDiscard,
  kDetectZeroes,
  kObject,
  kTlsCreds,
  kTlsHostname,
  kTlsAuthz,
  kImageOpts,
  kFork,
  kPidFile,
  kSelinuxLabel,
  kHandshakeLimit,
};

// QEMU's qemu_strtoi/qemu_strtou32 with base 0: the whole text is one number in range.
std::optional<long long> parse_integer(const char* text, long long min, long long max) {
  if (text == nullptr || *text == '\0') {
    return std::nullopt;
  }
  char* end = nullptr;
  errno = 0;
  long long value = std::strtoll(text, &end, 0);
  if (errno != 0 || *end != '\0' || value < min || value > max) {
    return std::nullopt;
  }
  return value;
}

// QEMU's bdrv_parse_cache_mode. False for an unknown mode.
bool apply_cache_mode(std::string_view mode, Options& options) {
  options.cache_direct = false;
  options.cache_no_flush = false;
  options.writethrough = false;
  if (mode == "off" || mode == "none") {
    options.cache_direct = true;
  } else if (mode == "directsync") {
    options.cache_direct = true;
    options.writethrough = true;
  } else if (mode == "writeback") {
  } else if (mode == "unsafe") {
    options.cache_no_flush = true;
  } else if (mode == "writethrough") {
    options.writethrough = true;
  } else {
    return false;
  }
  return true;
}

ParseOutcome fail(const std::string& message) {
  report(message);
  return ParseOutcome{std::nullopt, 1};
}

}  // namespace

void report(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", kProgram, message.c_str());
}

ParseOutcome parse_options(int argc, char** argv) {
  static const char kShortOptions[] = "hVb:o:p:rsnc:dvk:e:f:tl:x:T:D:AB:L";
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"version", no_argument, nullptr, 'V'},
      {"bind", required_argument, nullptr, 'b'},
      {"port", required_argument, nullptr, 'p'},
      {"socket", required_argument, nullptr, 'k'},
      {"offset", required_argument, nullptr, 'o'},
      {"read-only", no_argument, nullptr, 'r'},
      {"allocation-depth", no_argument, nullptr, 'A'},
      {"bitmap", required_argument, nullptr, 'B'},
      {"connect", required_argument, nullptr, 'c'},
      {"disconnect", no_argument, nullptr, 'd'},
      {"list", no_argument, nullptr, 'L'},
      {"snapshot", no_argument, nullptr, 's'},
      {"load-snapshot", required_argument, nullptr, 'l'},
      {"nocache", no_argument, nullptr, 'n'},
      {"cache", required_argument, nullptr, kCache},
      {"aio", required_argument, nullptr, kAio},
      {"discard", required_argument, nullptr, kDiscard},
      {"detect-zeroes", required_argument, nullptr, kDetectZeroes},
      {"shared", required_argument, nullptr, 'e'},
      {"format", required_argument, nullptr, 'f'},
      {"persistent", no_argument, nullptr, 't'},
      {"verbose", no_argument, nullptr, 'v'},
      {"object", required_argument, nullptr, kObject},
      {"export-name", required_argument, nullptr, 'x'},
      {"description", required_argument, nullptr, 'D'},
      {"tls-creds", required_argument, nullptr, kTlsCreds},
      {"tls-hostname", required_argument, nullptr, kTlsHostname},
      {"tls-authz", required_argument, nullptr, kTlsAuthz},
      {"image-opts", no_argument, nullptr, kImageOpts},
      {"trace", required_argument, nullptr, 'T'},
      {"fork", no_argument, nullptr, kFork},
      {"pid-file", required_argument, nullptr, kPidFile},
      {"selinux-label", required_argument, nullptr, kSelinuxLabel},
      {"handshake-limit", required_argument, nullptr, kHandshakeLimit},
      {nullptr, 0, nullptr, 0},
  };

  Options options;
  bool seen_cache = false;
  bool seen_aio = false;
  bool seen_discard = false;
  bool per_device = false;  // an option that only serving an image takes (not with -L)
  optind = 1;
  opterr = 0;
  int ch;
  while ((ch = getopt_long(argc, argv, kShortOptions, kLongOptions, nullptr)) != -1) {
    switch (ch) {
      case 's':
        options.snapshot = true;
        break;
      case 'n':
      case kCache: {
        if (seen_cache) {
          return fail("-n and --cache can only be specified once");
        }
        seen_cache = true;
        const char* mode = ch == 'n' ? "none" : optarg;
        if (!apply_cache_mode(mode, options)) {
          return fail(std::string("Invalid cache mode `") + mode + "'");
        }
        break;
      }
      case kAio: {
        if (seen_aio) {
          return fail("--aio can only be specified once");
        }
        seen_aio = true;
        std::string_view mode = optarg;
        if (mode != "native" && mode != "io_uring" && mode != "threads") {
          return fail(std::string("Invalid aio mode '") + optarg + "'");
        }
        options.aio = optarg;
        break;
      }
      case kDiscard: {
        if (seen_discard) {
          return fail("--discard can only be specified once");
        }
        seen_discard = true;
        std::string_view mode = optarg;
        if (mode == "off" || mode == "ignore") {
          options.discard = "ignore";
        } else if (mode == "on" || mode == "unmap") {
          options.discard = "unmap";
        } else {
          return fail(std::string("Invalid discard mode `") + optarg + "'");
        }
        break;
      }
      case kDetectZeroes: {
        std::string_view mode = optarg;
        if (mode != "off" && mode != "on" && mode != "unmap") {
          return fail(std::string("Failed to parse detect_zeroes mode: invalid parameter value: ") +
                      optarg);
        }
        if (mode == "unmap" && options.discard != "unmap") {
          return fail(
              "setting detect-zeroes to unmap is not allowed without setting discard operation "
              "to unmap");
        }
        options.detect_zeroes = optarg;
        break;
      }
      case 'b':
        options.bind_address = optarg;
        break;
      case 'p':
        options.port = optarg;
        break;
      case 'o':
        return fail("-o/--offset is not supported by strata nbd");
      case 'l':
        return fail("-l/--load-snapshot is not supported by strata nbd");
      case 'r':
        options.read_only = true;
        break;
      case 'A':
        options.allocation_depth = true;
        per_device = true;
        break;
      case 'B':
        options.bitmaps.emplace_back(optarg);
        per_device = true;
        break;
      case 'k':
        if (optarg[0] != '/') {
          return fail("socket path must be absolute");
        }
        options.socket_path = optarg;
        break;
      case 'c':
      case 'd':
        return fail(
            "kernel NBD devices (-c/--connect, -d/--disconnect) are not supported by strata nbd; "
            "serve on a socket and use an NBD client instead");
      case 'e': {
        auto shared = parse_integer(optarg, 0, INT_MAX);
        if (!shared) {
          return fail(std::string("Invalid shared device number '") + optarg + "'");
        }
        options.shared = static_cast<uint32_t>(*shared);
        break;
      }
      case 'f':
        options.format = optarg;
        per_device = true;
        break;
      case 't':
        options.persistent = true;
        break;
      case 'x':
        if (std::strlen(optarg) > nbd::kMaxStringSize) {
          return fail(std::string("export name '") + optarg + "' too long");
        }
        options.export_name = optarg;
        per_device = true;
        break;
      case 'D':
        if (std::strlen(optarg) > nbd::kMaxStringSize) {
          return fail(std::string("export description '") + optarg + "' too long");
        }
        options.description = optarg;
        per_device = true;
        break;
      case 'v':
        options.verbose = true;
        break;
      case 'V':
        std::printf("strata nbd version 0.1.0 (qemu-nbd 10.0 compatible)\n");
        return ParseOutcome{std::nullopt, 0};
      case 'h':
        std::fputs(kUsage, stdout);
        return ParseOutcome{std::nullopt, 0};
      case kObject:
        options.objects.emplace_back(optarg);
        break;
      case kTlsCreds:
        options.tls_creds = optarg;
        break;
      case kTlsHostname:
        options.tls_hostname = optarg;
        break;
      case kTlsAuthz:
        options.tls_authz = optarg;
        break;
      case 'L':
        options.list = true;
        break;
      case 'T':
        return fail("-T/--trace is not supported by strata nbd");
      case kSelinuxLabel:
        return fail("SELinux support not enabled in this binary");
      case kImageOpts:
        options.image_opts = true;
        break;
      case kFork:
        options.fork_process = true;
        break;
      case kPidFile:
        options.pid_file = optarg;
        break;
      case kHandshakeLimit: {
        auto limit = parse_integer(optarg, 0, INT_MAX);
        if (!limit) {
          return fail(std::string("Invalid handshake limit '") + optarg + "'");
        }
        options.handshake_limit = static_cast<uint32_t>(*limit);
        break;
      }
      default: {
        const char* name = argv[optind - 1];
        if (optopt >= 256) {
          report(std::string("option '") + name + "' requires an argument");
        } else if (optopt > 0 && std::strchr(kShortOptions, optopt) != nullptr) {
          report(std::string("option requires an argument -- '") + static_cast<char>(optopt) + "'");
        } else if (optopt != 0) {
          report(std::string("invalid option -- '") + static_cast<char>(optopt) + "'");
        } else {
          report(std::string("unrecognized option '") + name + "'");
        }
        report("Try `strata nbd --help' for more information.");
        return ParseOutcome{std::nullopt, 1};
      }
    }
  }
  if (options.list) {
    // qemu-nbd's order of checks.
    if (argc != optind) {
      return fail("List mode is incompatible with a file name");
    }
    if (per_device || seen_aio || seen_discard || seen_cache) {
      return fail("List mode is incompatible with per-device settings");
    }
    if (options.fork_process) {
      return fail("List mode is incompatible with forking");
    }
  } else if (argc - optind != 1) {
    report("Invalid number of arguments");
    std::fprintf(stderr, "Try `strata nbd --help' for more information.\n");
    return ParseOutcome{std::nullopt, 1};
  } else {
    options.filename = argv[optind];
  }
  if (options.tls_creds) {
    if (options.tls_authz && options.list) {
      return fail("TLS authorization is incompatible with export list");
    }
    if (options.tls_hostname && !options.list) {
      return fail("TLS hostname is only supported with export list");
    }
  } else if (options.tls_authz) {
    return fail("--tls-authz is not permitted without --tls-creds");
  } else if (options.tls_hostname) {
    return fail("--tls-hostname is not permitted without --tls-creds");
  }
  if (options.image_opts && options.format) {
    return fail("--image-opts and -f are mutually exclusive");
  }
  return ParseOutcome{std::move(options), 0};
}

}  // namespace strata::cli::nbd_cmd
