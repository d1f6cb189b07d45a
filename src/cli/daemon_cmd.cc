// `strata daemon`: qemu-storage-daemon's command line. Options are processed in order, as QSD
// does; the first failing option ends the process with "strata daemon: --opt ARG: message".
// Without any option, an embedded default runs: a data directory with a disk, and a QMP socket.

#include <fcntl.h>
#include <getopt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "aio/task_group.h"
#include "base/arg_decoder.h"
#include "base/keyval.h"
#include "cli/commands.h"
#include "cli/signal_watcher.h"
#include "daemon/daemon.h"
#include "daemon/exports.h"

namespace strata::cli {

namespace {

constexpr const char* kUsage =
    "Usage: strata daemon [options]\n"
    "strata's storage daemon: the block graph and QMP monitors, driven like qemu-storage-daemon.\n"
    "\n"
    "  -h, --help                display this help and exit\n"
    "  -V, --version             output version information and exit\n"
    "\n"
    "  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]\n"
    "             [,cache.direct=on|off][,cache.no-flush=on|off]\n"
    "             [,read-only=on|off][,auto-read-only=on|off]\n"
    "             [,force-share=on|off][,detect-zeroes=on|off|unmap]\n"
    "             [,active=on|off][,driver specific parameters...]\n"
    "                            configure a block backend (or a JSON object)\n"
    "  --chardev socket,id=<id>,path=<path>[,server=on][,wait=off]\n"
    "  --chardev stdio,id=<id>   configure a character device for a monitor\n"
    "  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]\n"
    "                            configure a QMP monitor\n"
    "  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]\n"
    "           [,writable=on|off][,writethrough=on|off][,description=<text>]\n"
    "           [,allocation-depth=on|off][,allow-inactive=on|off]\n"
    "                            export the specified block node over NBD\n"
    "  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>\n"
    "               [,max-connections=<n>][,handshake-max-seconds=<n>]\n"
    "  --nbd-server addr.type=unix,addr.path=<path>\n"
    "               [,max-connections=<n>][,handshake-max-seconds=<n>]\n"
    "                            start an NBD server for exporting block nodes\n"
    "  --object iothread,id=<id> create an iothread object\n"
    "  --pidfile <path>          write the process ID to a file after startup\n"
    "  --daemonize               daemonize the process, and have the parent exit\n"
    "                            once startup is complete\n"
    "\n"
    "Without options: create ./strata-data with a 1 GiB disk, serve QMP on\n"
    "./strata-data/qmp.sock and export the disk over NBD on ./strata-data/nbd.sock\n"
    "and 127.0.0.1:10809 (export name 'disk').\n";

struct Chardev {
  std::string backend;  // socket | stdio
  std::string path;
};

// A failure of one command-line option, reported QSD-style.
[[noreturn]] void fail_option(const std::string& option, const std::string& argument,
                              const std::string& message) {
  std::fprintf(stderr, "strata daemon: --%s %s: %s\n", option.c_str(), argument.c_str(),
               message.c_str());
  std::exit(1);
}

Result<nlohmann::json> parse_option(std::string_view text, std::string_view implied_key) {
  return qmp::parse_keyval_or_json(text, implied_key);
}

// Forks; the parent waits until the child reports that startup finished, then exits with the
// child's status. Returns the write end of the status pipe in the child.
int daemonize() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    std::perror("strata daemon: pipe");
    std::exit(1);
  }
  pid_t pid = fork();
  if (pid < 0) {
    std::perror("strata daemon: fork");
    std::exit(1);
  }
  if (pid > 0) {
    ::close(fds[1]);
    char status = 1;
    ssize_t n = ::read(fds[0], &status, 1);
    std::_Exit(n == 1 ? status : 1);
  }
  ::close(fds[0]);
  setsid();
  return fds[1];
}

void finish_daemonize(int status_fd) {
  int null_fd = ::open("/dev/null", O_RDWR);
  if (null_fd >= 0) {
    dup2(null_fd, STDIN_FILENO);
    dup2(null_fd, STDOUT_FILENO);
    dup2(null_fd, STDERR_FILENO);
    ::close(null_fd);
  }
  char ok = 0;
  ssize_t written = ::write(status_fd, &ok, 1);
  (void)written;
  ::close(status_fd);
}

// The embedded default: ./strata-data/disk.img (1 GiB, sparse) as node "disk", QMP on
// ./strata-data/qmp.sock.
Result<void> setup_default(daemon::Daemon& daemon) {
  const std::string dir = "strata-data";
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Error::from_errno(errno, "Could not create '" + dir + "'");
  }
  const std::string image = dir + "/disk.img";
  int fd = ::open(image.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    return Error::from_errno(errno, "Could not create '" + image + "'");
  }
  struct stat st {};
  if (::fstat(fd, &st) == 0 && st.st_size == 0) {
    if (::ftruncate(fd, 1ll << 30) != 0) {
      ::close(fd);
      return Error::from_errno(errno, "Could not size '" + image + "'");
    }
  }
  ::close(fd);
  nlohmann::json disk = {{"driver", "raw"},
                         {"node-name", "disk"},
                         {"file", {{"driver", "file"}, {"filename", image}}}};
  auto added = daemon.blockdev_add(disk, false);
  if (!added) {
    return added;
  }
  const std::string socket = dir + "/qmp.sock";
  auto listening = daemon.monitors().listen_unix(socket, {});
  if (!listening) {
    return listening;
  }
  // The disk over NBD: a unix socket next to the QMP one and the NBD port on loopback. A port
  // taken by another server is reported and skipped; the unix socket alone still serves.
  const std::string nbd_socket = dir + "/nbd.sock";
  std::vector<daemon::ListenAddress> addresses = {{"unix", nbd_socket, "", ""},
                                                  {"inet", "", "127.0.0.1", "10809"}};
  std::vector<Error> failures;
  auto serving = daemon.exports().start_server_on(addresses, nbd::ServerConfig{}, &failures);
  if (!serving) {
    return serving;
  }
  for (const Error& failure : failures) {
    std::fprintf(stderr, "strata daemon: warning: NBD listener not started: %s\n",
                 failure.message().c_str());
  }
  auto exported = daemon.exports().add_export(
      {{"type", "nbd"}, {"id", "disk"}, {"node-name", "disk"}, {"writable", true}}, false);
  if (!exported) {
    return exported;
  }
  std::printf(
      "strata daemon: serving node 'disk' (raw, 1 GiB) from %s\n"
      "QMP monitor on %s; connect with:\n"
      "  build/strata qmp %s query-named-block-nodes\n"
      "  build/strata qmp %s            (interactive shell)\n"
      "NBD export 'disk' (writable) on %s%s; for example:\n"
      "  nbdinfo 'nbd+unix:///disk?socket=%s'\n"
      "Stop with Ctrl-C or the QMP command 'quit'.\n",
      image.c_str(), socket.c_str(), socket.c_str(), socket.c_str(), nbd_socket.c_str(),
      failures.empty() ? " and nbd://127.0.0.1:10809/disk" : "", nbd_socket.c_str());
  std::fflush(stdout);
  return ok();
}

}  // namespace

int daemon_main(int argc, char** argv) {
  enum { kBlockdev = 256, kChardev, kMonitor, kObject, kPidfile, kDaemonize, kNbdServer, kExport };
  static const option kOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"version", no_argument, nullptr, 'V'},
      {"blockdev", required_argument, nullptr, kBlockdev},
      {"chardev", required_argument, nullptr, kChardev},
      {"monitor", required_argument, nullptr, kMonitor},
      {"object", required_argument, nullptr, kObject},
      {"pidfile", required_argument, nullptr, kPidfile},
      {"daemonize", no_argument, nullptr, kDaemonize},
      {"nbd-server", required_argument, nullptr, kNbdServer},
      {"export", required_argument, nullptr, kExport},
      {nullptr, 0, nullptr, 0},
  };

  // First pass: options that change how the process starts.
  bool want_daemonize = false;
  std::string pidfile;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "-V" || arg == "--version") {
      std::printf("strata daemon version 0.1.0 (qemu-storage-daemon 10.0 compatible)\n");
      return 0;
    }
    if (arg == "--daemonize") {
      want_daemonize = true;
    }
  }
  int status_fd = want_daemonize ? daemonize() : -1;

  auto loop = aio::EventLoop::create();
  if (!loop) {
    std::fprintf(stderr, "strata daemon: %s\n", loop.error().message().c_str());
    return 1;
  }
  daemon::Daemon daemon(**loop);
  SignalWatcher signals(**loop, [&daemon] { daemon.stop(); });
  std::map<std::string, Chardev> chardevs;

  if (argc == 1) {
    auto ready = setup_default(daemon);
    if (!ready) {
      std::fprintf(stderr, "strata daemon: %s\n", ready.error().message().c_str());
      return 1;
    }
  }

  optind = 1;
  opterr = 0;
  int opt;
  while ((opt = getopt_long(argc, argv, "-hV", kOptions, nullptr)) != -1) {
    std::string argument = optarg != nullptr ? optarg : "";
    switch (opt) {
      case kBlockdev: {
        auto options = parse_option(argument, "driver");
        if (!options) {
          fail_option("blockdev", argument, options.error().message());
        }
        bool keyval = !qmp::option_is_json(argument);
        auto added = daemon.blockdev_add(*options, keyval);
        if (!added) {
          fail_option("blockdev", argument, added.error().message());
        }
        break;
      }
      case kChardev: {
        auto options = parse_option(argument, "backend");
        if (!options) {
          fail_option("chardev", argument, options.error().message());
        }
        ArgDecoder d(*options, "", true);
        static constexpr std::array<std::string_view, 2> kBackends = {"socket", "stdio"};
        Chardev chardev;
        chardev.backend = d.enumeration("backend", kBackends);
        std::string id = d.str("id");
        if (chardev.backend == "socket") {
          chardev.path = d.str("path");
          bool server = d.opt_bool("server").value_or(false);
          bool wait = d.opt_bool("wait").value_or(true);
          (void)wait;  // a server never blocks startup waiting for a client here
          if (!server) {
            fail_option("chardev", argument, "client socket chardevs are not supported");
          }
        }
        (void)d.opt_bool("mux");
        (void)d.opt_str("logfile");
        (void)d.opt_bool("signal");
        auto decoded = d.finish();
        if (!decoded) {
          fail_option("chardev", argument, decoded.error().message());
        }
        if (chardevs.count(id) != 0) {
          fail_option(
              "chardev", argument,
              "attempt to add duplicate property '" + id + "' to object (type 'container')");
        }
        chardevs[id] = chardev;
        break;
      }
      case kMonitor: {
        auto options = parse_option(argument, "chardev");
        if (!options) {
          fail_option("monitor", argument, options.error().message());
        }
        ArgDecoder d(*options, "", true);
        std::string chardev_id = d.str("chardev");
        static constexpr std::array<std::string_view, 2> kModes = {"readline", "control"};
        std::string mode = d.opt_enum("mode", kModes).value_or("control");
        bool pretty = d.opt_bool("pretty").value_or(false);
        (void)d.opt_str("id");
        auto decoded = d.finish();
        if (!decoded) {
          fail_option("monitor", argument, decoded.error().message());
        }
        if (mode != "control") {
          fail_option("monitor", argument, "Only QMP is supported");
        }
        auto it = chardevs.find(chardev_id);
        if (it == chardevs.end()) {
          fail_option("monitor", argument, "chardev \"" + chardev_id + "\" not found");
        }
        qmp::MonitorOptions monitor_options;
        monitor_options.pretty = pretty;
        if (it->second.backend == "stdio") {
          daemon.monitors().serve_fds(STDIN_FILENO, STDOUT_FILENO, monitor_options);
        } else {
          auto listening = daemon.monitors().listen_unix(it->second.path, monitor_options);
          if (!listening) {
            fail_option("monitor", argument, listening.error().message());
          }
        }
        break;
      }
      case kObject: {
        auto options = parse_option(argument, "qom-type");
        if (!options) {
          fail_option("object", argument, options.error().message());
        }
        auto added = daemon.object_add(*options, !qmp::option_is_json(argument));
        if (!added) {
          fail_option("object", argument, added.error().message());
        }
        break;
      }
      case kNbdServer: {
        auto options = parse_option(argument, "");
        if (!options) {
          fail_option("nbd-server", argument, options.error().message());
        }
        auto started = daemon.exports().start_server(*options, !qmp::option_is_json(argument));
        if (!started) {
          fail_option("nbd-server", argument, started.error().message());
        }
        break;
      }
      case kExport: {
        auto options = parse_option(argument, "type");
        if (!options) {
          fail_option("export", argument, options.error().message());
        }
        auto added = daemon.exports().add_export(*options, !qmp::option_is_json(argument));
        if (!added) {
          fail_option("export", argument, added.error().message());
        }
        break;
      }
      case kPidfile:
        pidfile = argument;
        break;
      case kDaemonize:
        break;
      case 1:
        std::fprintf(stderr, "strata daemon: Unexpected argument: %s\n", argument.c_str());
        return 1;
      default: {
        const char* name = argv[optind - 1];
        std::fprintf(stderr, "strata daemon: unrecognized option '%s'\n", name);
        std::fputs("Try 'strata daemon --help' for more information.\n", stderr);
        return 1;
      }
    }
  }

  int pidfile_fd = -1;
  if (!pidfile.empty()) {
    // Like QEMU: mode 0600, and a write lock held while the daemon lives so a second daemon with
    // the same pid file refuses to start.
    pidfile_fd = ::open(pidfile.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (pidfile_fd < 0) {
      std::fprintf(stderr, "strata daemon: Cannot open pid file %s: %s\n", pidfile.c_str(),
                   std::strerror(errno));
      return 1;
    }
    struct flock lock {};
    lock.l_type = F_WRLCK;
    lock.l_whence = SEEK_SET;
    if (::fcntl(pidfile_fd, F_SETLK, &lock) != 0) {
      std::fprintf(stderr, "strata daemon: Cannot lock pid file %s: %s\n", pidfile.c_str(),
                   std::strerror(errno));
      return 1;
    }
    std::string pid = std::to_string(getpid()) + "\n";
    if (::ftruncate(pidfile_fd, 0) != 0 ||
        ::write(pidfile_fd, pid.data(), pid.size()) != static_cast<ssize_t>(pid.size())) {
      std::fprintf(stderr, "strata daemon: Failed to write pid file %s: %s\n", pidfile.c_str(),
                   std::strerror(errno));
      return 1;
    }
  }
  if (status_fd >= 0) {
    finish_daemonize(status_fd);
  }

  daemon.run();
  if (pidfile_fd >= 0) {
    ::unlink(pidfile.c_str());
    ::close(pidfile_fd);
  }
  return 0;
}

}  // namespace strata::cli
