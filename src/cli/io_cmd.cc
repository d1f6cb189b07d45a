// `strata io`: qemu-io's command line and command language (io_commands.h) on strata's block
// layer.

#include <getopt.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "cli/block_tool.h"
#include "cli/commands.h"
#include "cli/io_commands.h"

namespace strata::cli {
namespace {

constexpr const char kProgram[] = "strata io";

constexpr const char kUsage[] =
    "usage: strata io [OPTIONS]... [-c STRING]... [file]\n"
    "\n"
    "qemu-io's command language on strata's block layer.\n"
    "\n"
    "  -c, --cmd STRING     execute command with its arguments from the given string\n"
    "  -f, --format FMT     specifies the block driver to use\n"
    "  -r, --read-only      export read-only\n"
    "  -n, --nocache        disable host cache, cache=none (cache.direct=on)\n"
    "  -U, --force-share    force shared permissions\n"
    "      --image-opts     treat file as option string (keyval or JSON)\n"
    "      --object OBJDEF  create an object (tls-creds-x509, tls-creds-psk, authz-*)\n"
    "  -t, --cache=MODE     cache mode: none, writeback, unsafe, directsync, writethrough\n"
    "  -h, --help           display this help and exit\n"
    "\n"
    "Commands: read, readv, write, writev, aio_read, aio_write, aio_flush, discard, flush,\n"
    "map, length, truncate, sigraise, quit (see docs/io.md). Without -c, commands are read\n"
    "from standard input, one per line.\n";

}  // namespace

int io_main(int argc, char** argv) {
  enum { kImageOpts = 256, kObject };
  static const option kLongOptions[] = {
      {"help", no_argument, nullptr, 'h'},
      {"cmd", required_argument, nullptr, 'c'},
      {"format", required_argument, nullptr, 'f'},
      {"read-only", no_argument, nullptr, 'r'},
      {"nocache", no_argument, nullptr, 'n'},
      {"cache", required_argument, nullptr, 't'},
      {"force-share", no_argument, nullptr, 'U'},
      {"image-opts", no_argument, nullptr, kImageOpts},
      {"object", required_argument, nullptr, kObject},
      {nullptr, 0, nullptr, 0},
  };
  std::vector<std::string> commands;
  ImageOpenRequest request;
  request.read_only = false;
  request.discard_unmap = true;
  request.warn_probed_raw = true;
  bool image_opts = false;
  optind = 1;
  int c = 0;
  while ((c = getopt_long(argc, argv, "+hc:f:rnt:UqT:", kLongOptions, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::fputs(kUsage, stdout);
        return 0;
      case 'c':
        commands.emplace_back(optarg);
        break;
      case 'f':
        request.format = optarg;
        break;
      case 'r':
        request.read_only = true;
        break;
      case 'n':
        request.cache_direct = true;
        break;
      case 'U':
        request.force_share = true;
        break;
      case 'q':
        break;
      case 'T':
        break;
      case 't': {
        std::string mode = optarg;
        if (mode == "none" || mode == "off") {
          request.cache_direct = true;
        } else if (mode == "directsync") {
          request.cache_direct = true;
        } else if (mode == "unsafe") {
          request.cache_no_flush = true;
        } else if (mode != "writeback" && mode != "writethrough") {
          std::fprintf(stderr, "%s: Invalid cache option: %s\n", kProgram, optarg);
          return 1;
        }
        break;
      }
      case kObject: {
        auto added = add_tool_object(optarg);
        if (!added) {
          std::fprintf(stderr, "%s: %s\n", kProgram, added.error().message().c_str());
          return 1;
        }
        break;
      }
      case kImageOpts:
        image_opts = true;
        break;
      default:
        std::fputs(kUsage, stderr);
        return 1;
    }
  }
  if (optind < argc - 1) {
    std::fprintf(stderr, "%s: too many arguments\n", kProgram);
    std::fputs(kUsage, stderr);
    return 1;
  }
  if (image_opts && request.format) {
    std::fprintf(stderr, "%s: --image-opts and -f are mutually exclusive\n", kProgram);
    return 1;
  }
  auto session = BlockSession::create();
  if (!session) {
    std::fprintf(stderr, "%s: %s\n", kProgram, session.error().message().c_str());
    return 1;
  }
  block::Node* node = nullptr;
  if (optind < argc) {
    if (image_opts) {
      request.image_opts = argv[optind];
    } else {
      request.filename = argv[optind];
    }
    auto opened = (*session)->open(request);
    if (!opened) {
      if (image_opts) {
        std::fprintf(stderr, "%s: can't open: %s\n", kProgram, opened.error().message().c_str());
      } else {
        std::fprintf(stderr, "%s: can't open device %s: %s\n", kProgram, argv[optind],
                     opened.error().message().c_str());
      }
      return 1;
    }
    node = *opened;
  }

  int last_error = 0;
  {
    IoShell shell(**session, node, kProgram);
    auto run = [&](const std::string& line) {
      int result = shell.run(line);
      if (result < 0) {
        last_error = result;
      }
    };
    if (!commands.empty()) {
      for (const auto& line : commands) {
        run(line);
        if (shell.quit_requested()) {
          break;
        }
      }
    } else {
      std::string line;
      const bool interactive = isatty(STDIN_FILENO) != 0;
      for (;;) {
        if (interactive) {
          std::fputs("qemu-io> ", stdout);
          std::fflush(stdout);
        }
        if (!std::getline(std::cin, line)) {
          break;
        }
        run(line);
        if (shell.quit_requested()) {
          break;
        }
      }
    }
    shell.drain();
  }
  std::fflush(stdout);
  return last_error != 0 ? 1 : 0;
}

}  // namespace strata::cli
