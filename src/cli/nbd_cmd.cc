// `strata nbd`: qemu-nbd's server mode. One image is opened as a node of a Daemon and served by
// the daemon's own NBD server and export code (daemon/exports.h) on one listener, so everything
// the daemon's exports do (protocol, limits, block status, allocation depth, bitmaps) holds here.
//
// Process life, as qemu-nbd's: at most `-e` clients at once (later ones wait in the listen
// backlog); without -t the process exits once a client that reached transmission has left and no
// other client is connected; SIGTERM/SIGINT/SIGHUP end it cleanly. --fork returns in the parent
// once the server is ready, with the child's startup errors copied to the parent's stderr.

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "base/keyval.h"
#include "cli/block_tool.h"
#include "cli/commands.h"
#include "cli/img_internal.h"
#include "cli/nbd_cmd_internal.h"
#include "cli/signal_watcher.h"
#include "daemon/daemon.h"
#include "daemon/exports.h"

namespace strata::cli {

namespace {

using nbd_cmd::Options;
using nbd_cmd::report;

constexpr const char kNodeName[] = "nbd-image";
constexpr const char kExportId[] = "qemu-nbd-export";

// --fork: the parent copies what the child writes on stderr until the child closes it (startup
// finished or failed), then exits 1 if anything was written, else 0 (qemu-nbd's rule). Returns in
// the child with stdin/stdout on /dev/null and stderr on the pipe; finish_fork() ends startup.
void fork_into_background() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    report(std::string("Error setting up communication pipe: ") + std::strerror(errno));
    std::exit(1);
  }
  pid_t pid = fork();
  if (pid < 0) {
    report(std::string("Failed to fork: ") + std::strerror(errno));
    std::exit(1);
  }
  if (pid > 0) {
    ::close(fds[1]);
    bool errors = false;
    char buffer[1024];
    ssize_t n;
    while ((n = ::read(fds[0], buffer, sizeof(buffer))) > 0 || (n < 0 && errno == EINTR)) {
      if (n > 0) {
        errors = true;
        if (::write(STDERR_FILENO, buffer, static_cast<size_t>(n)) < 0) {
          std::_Exit(1);
        }
      }
    }
    std::_Exit(errors ? 1 : 0);
  }
  ::close(fds[0]);
  setsid();
  int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, STDIN_FILENO);
    ::dup2(null_fd, STDOUT_FILENO);
    ::close(null_fd);
  }
  ::dup2(fds[1], STDERR_FILENO);
  ::close(fds[1]);
}

// Startup is over: stderr leaves the pipe for /dev/null (as qemu-nbd's), so the parent sees the
// end of the pipe and exits 0, and nothing keeps its caller's stderr open.
void finish_fork() {
  int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, STDERR_FILENO);
    ::close(null_fd);
  }
}

// QEMU's qemu_write_pidfile: mode 0600, write-locked for the life of the process.
bool write_pid_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    report("Cannot open pid file: " + std::string(std::strerror(errno)));
    return false;
  }
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  if (::fcntl(fd, F_SETLK, &lock) != 0) {
    report("Cannot lock pid file: " + std::string(std::strerror(errno)));
    ::close(fd);
    return false;
  }
  std::string pid = std::to_string(getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 ||
      ::write(fd, pid.data(), pid.size()) != static_cast<ssize_t>(pid.size())) {
    report("Failed to write pid file: " + std::string(std::strerror(errno)));
    ::close(fd);
    return false;
  }
  return true;  // the descriptor (and its lock) lives until the process exits
}

// The blockdev options of the served image: FILE (or --image-opts) with the -r, cache, aio,
// discard and detect-zeroes choices. `probed` tells whether the format was guessed.
Result<ImageOptions> served_image_options(const Options& o) {
  ImageOpenRequest request;
  if (o.image_opts) {
    request.image_opts = o.filename;
  } else {
    request.filename = o.filename;
  }
  request.format = o.format;
  request.read_only = o.read_only || o.snapshot;
  request.cache_direct = o.cache_direct;
  request.cache_no_flush = o.cache_no_flush;
  return image_options(request);
}

// Extra options of the node actually exported (the image, or its -s overlay).
void add_node_options(const Options& o, bool keyval, nlohmann::json& options) {
  if (!options.contains("node-name")) {
    options["node-name"] = kNodeName;
  }
  if (o.discard) {
    options["discard"] = *o.discard;
  }
  if (o.detect_zeroes) {
    options["detect-zeroes"] = *o.detect_zeroes;
  }
  if (o.snapshot) {
    options["read-only"] =
        keyval ? nlohmann::json(o.read_only ? "on" : "off") : nlohmann::json(o.read_only);
  }
}

// --aio belongs to the protocol node: the image itself when it is a `file` node, else its `file`
// child given inline.
void add_aio_option(const Options& o, nlohmann::json& options) {
  if (!o.aio) {
    return;
  }
  if (options.value("driver", "") == "file") {
    options["aio"] = *o.aio;
  } else if (options.contains("file") && options["file"].is_object()) {
    options["file"]["aio"] = *o.aio;
  }
}

// -s: a temporary qcow2 overlay over the image (QEMU's bdrv_append_temp_snapshot); the overlay
// file is unlinked once open, so it disappears with the process. Returns the overlay's options.
Result<nlohmann::json> temporary_overlay(const Options& o, const ImageOptions& image,
                                         std::string& overlay_path) {
  if (o.image_opts) {
    return make_error(ErrorKind::kInvalidArgument,
                      "-s/--snapshot with --image-opts is not supported by strata nbd");
  }
  char absolute[PATH_MAX];
  if (::realpath(o.filename.c_str(), absolute) == nullptr) {
    return Error::from_errno(errno, "Could not open '" + o.filename + "'");
  }
  const char* tmpdir = std::getenv("TMPDIR");
  std::string pattern = std::string(tmpdir != nullptr ? tmpdir : "/var/tmp") + "/vl.XXXXXX";
  int fd = ::mkstemp(pattern.data());
  if (fd < 0) {
    return Error::from_errno(errno, "Could not get temporary filename");
  }
  ::close(fd);
  overlay_path = pattern;
  std::map<std::string, std::string> create_options = {
      {"backing_file", absolute}, {"backing_fmt", image.options.value("driver", "raw")}};
  if (img::create_qcow2(overlay_path, create_options, std::nullopt, false, true, "") != 0) {
    ::unlink(overlay_path.c_str());
    return make_error(ErrorKind::kIo, "Could not create temporary overlay '" + overlay_path + "'");
  }
  nlohmann::json overlay = {{"driver", "qcow2"},
                            {"file", {{"driver", "file"}, {"filename", overlay_path}}}};
  if (o.cache_direct || o.cache_no_flush) {
    overlay["cache"] = {{"direct", o.cache_direct}, {"no-flush", o.cache_no_flush}};
  }
  return overlay;
}

// --object, in command-line order; false after reporting a failure.
bool create_objects(const Options& o, daemon::Daemon& daemon) {
  for (const std::string& object : o.objects) {
    auto object_options = qmp::parse_keyval_or_json(object, "qom-type");
    if (!object_options) {
      report(object_options.error().message());
      return false;
    }
    auto added = daemon.object_add(*object_options, !qmp::option_is_json(object));
    if (!added) {
      report(added.error().message());
      return false;
    }
  }
  return true;
}

}  // namespace

int nbd_main(int argc, char** argv) {
  nbd_cmd::ParseOutcome parsed = nbd_cmd::parse_options(argc, argv);
  if (!parsed.options) {
    return parsed.exit_code;
  }
  const Options& o = *parsed.options;

  if (o.list) {
    auto loop = aio::EventLoop::create();
    if (!loop) {
      report(loop.error().message());
      return 1;
    }
    daemon::Daemon daemon(**loop);
    if (!create_objects(o, daemon)) {
      return 1;
    }
    return nbd_cmd::list_exports(o, daemon, **loop);
  }
  if (o.fork_process) {
    fork_into_background();
  }

  // The image's options first: -s creates its overlay with a loop of its own, before ours runs.
  auto image = served_image_options(o);
  if (!image) {
    report("Failed to blk_new_open '" + o.filename + "': " + image.error().message());
    return 1;
  }
  nlohmann::json node_options = image->options;
  bool keyval = image->keyval;
  std::string overlay_path;
  if (o.snapshot) {
    auto overlay = temporary_overlay(o, *image, overlay_path);
    if (!overlay) {
      report("Failed to blk_new_open '" + o.filename + "': " + overlay.error().message());
      return 1;
    }
    node_options = std::move(overlay).value();
    keyval = false;
  }
  add_node_options(o, keyval, node_options);
  add_aio_option(o, node_options);

  auto loop = aio::EventLoop::create();
  if (!loop) {
    report(loop.error().message());
    return 1;
  }
  daemon::Daemon daemon(**loop);
  SignalWatcher signals(**loop, [&daemon] { daemon.stop(); });

  if (!create_objects(o, daemon)) {
    return 1;
  }
  std::shared_ptr<const nbd::ServerTls> tls;
  if (o.tls_creds) {
    auto resolved = daemon.exports().server_tls(*o.tls_creds, o.tls_authz);
    if (!resolved) {
      report("Failed to get TLS creds: " + resolved.error().message());
      return 1;
    }
    tls = std::move(resolved).value();
  }

  // Listen first, as qemu-nbd does (a busy port fails before the image is opened).
  daemon::ListenAddress address;
  if (o.socket_path) {
    address = {"unix", *o.socket_path, "", ""};
  } else {
    address = {"inet", "", o.bind_address, o.port};
  }
  nbd::ServerConfig config;
  config.max_connections = o.shared;
  config.handshake_max_seconds = o.handshake_limit;
  config.tls = std::move(tls);
  const bool persistent = o.persistent;
  config.on_client_closed = [&daemon, persistent](bool negotiated, size_t remaining) {
    if (negotiated && remaining == 0 && !persistent) {
      daemon.stop();
    }
  };
  auto listening = daemon.exports().start_server_on({address}, std::move(config), nullptr);
  if (!listening) {
    report(listening.error().message());
    return 1;
  }

  auto opened = daemon.blockdev_add(node_options, keyval);
  if (!overlay_path.empty()) {
    ::unlink(overlay_path.c_str());
  }
  if (!opened) {
    report("Failed to blk_new_open '" + o.filename + "': " + opened.error().message());
    return 1;
  }
  const std::string node_name = node_options.value("node-name", kNodeName);
  if (image->probed && !o.read_only && !o.snapshot && image->options.value("driver", "") == "raw") {
    std::fprintf(stderr,
                 "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
                 "         Automatically detecting the format is dangerous for raw images, "
                 "write operations on block 0 will be restricted.\n"
                 "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                 o.filename.c_str());
  }

  nlohmann::json export_options = {{"type", "nbd"},
                                   {"id", kExportId},
                                   {"node-name", node_name},
                                   {"name", o.export_name},
                                   {"writable", !o.read_only},
                                   {"writethrough", o.writethrough},
                                   {"allocation-depth", o.allocation_depth}};
  if (o.description) {
    export_options["description"] = *o.description;
  }
  if (!o.bitmaps.empty()) {
    export_options["bitmaps"] = o.bitmaps;
  }
  auto exported = daemon.exports().add_export(export_options, false);
  if (!exported) {
    report(exported.error().message());
    return 1;
  }

  if (o.pid_file && !write_pid_file(*o.pid_file)) {
    return 1;
  }
  // Like qemu-nbd: nothing keeps a directory busy once serving.
  if (::chdir("/") != 0) {
    report(std::string("Could not chdir to root directory: ") + std::strerror(errno));
    return 1;
  }
  if (o.fork_process) {
    finish_fork();
  }
  if (o.verbose) {
    std::fprintf(stderr, "%s: serving '%s' as export '%s'\n", nbd_cmd::kProgram, o.filename.c_str(),
                 o.export_name.c_str());
  }

  daemon.run();
  return 0;
}

}  // namespace strata::cli
