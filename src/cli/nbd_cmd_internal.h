#pragma once
// `strata nbd` (qemu-nbd's server mode): the parsed command line, shared by the option parser
// (nbd_cmd_options.cc) and the server runner (nbd_cmd.cc).

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace strata::aio {
class EventLoop;
}  // namespace strata::aio
namespace strata::daemon {
class Daemon;
}  // namespace strata::daemon

namespace strata::cli::nbd_cmd {

constexpr const char kProgram[] = "strata nbd";

// Everything qemu-nbd's getopt loop collects, validated as qemu-nbd validates it while parsing.
struct Options {
  std::string filename;
  std::optional<std::string> format;  // -f
  bool image_opts = false;            // --image-opts: FILENAME is a set of blockdev options
  bool read_only = false;             // -r
  bool snapshot = false;              // -s: writes go to a temporary qcow2 overlay
  // --cache / -n (QEMU's bdrv_parse_cache_mode).
  bool cache_direct = false;
  bool cache_no_flush = false;
  bool writethrough = false;
  std::optional<std::string> aio;            // --aio: threads | native | io_uring
  std::optional<std::string> discard;        // --discard: ignore | unmap
  std::optional<std::string> detect_zeroes;  // --detect-zeroes: off | on | unmap
  std::string export_name;                   // -x (default "")
  std::optional<std::string> description;    // -D
  bool allocation_depth = false;             // -A
  std::vector<std::string> bitmaps;          // -B, in command-line order
  std::optional<std::string> socket_path;    // -k
  std::string bind_address = "0.0.0.0";      // -b
  std::string port = "10809";                // -p
  uint32_t shared = 1;                       // -e: clients at once, 0 = unlimited
  bool persistent = false;                   // -t: keep serving after the last client leaves
  uint32_t handshake_limit = 10;             // --handshake-limit seconds
  std::vector<std::string> objects;          // --object, created in order after --fork
  bool fork_process = false;                 // --fork
  std::optional<std::string> pid_file;       // --pid-file
  bool verbose = false;                      // -v
  // TLS: server credentials (client ones with --list), authz by x509 name, the name a listed
  // server's certificate must carry (--list only).
  std::optional<std::string> tls_creds;     // --tls-creds
  std::optional<std::string> tls_authz;     // --tls-authz
  std::optional<std::string> tls_hostname;  // --tls-hostname
  bool list = false;                        // -L: list the exports of a server, serve nothing
};

// Outcome of parsing: run the server, or exit now with `exit_code` (help, version, errors; the
// messages have been printed).
struct ParseOutcome {
  std::optional<Options> options;
  int exit_code = 0;
};

// Parses argv (argv[0] is "nbd") with qemu-nbd's options, messages and exit codes.
ParseOutcome parse_options(int argc, char** argv);

// -L: lists the exports of the server -k (or -b and -p) names, with TLS from the client
// credentials object --tls-creds names (created in `daemon`); the exit status.
int list_exports(const Options& o, daemon::Daemon& daemon, aio::EventLoop& loop);

// Prints "strata nbd: MESSAGE" on stderr.
void report(const std::string& message);

}  // namespace strata::cli::nbd_cmd
