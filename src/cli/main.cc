// strata: one executable, several faces (see docs/ and ARCHITECTURE.md).

#include <cstdio>
#include <cstring>
#include <string_view>

#include "cli/commands.h"

namespace {

struct SubCommand {
  const char* name;
  int (*main)(int, char**);
  const char* summary;
};

constexpr SubCommand kSubCommands[] = {
    {"daemon", strata::cli::daemon_main,
     "storage daemon (qemu-storage-daemon command line and QMP)"},
    {"qmp", strata::cli::qmp_main, "QMP client: one-shot command or interactive shell"},
    {"img", strata::cli::img_main, "disk image utility (qemu-img syntax: info, map, compare, ...)"},
    {"io", strata::cli::io_main, "image I/O exerciser (qemu-io syntax and commands)"},
    {"nbd", strata::cli::nbd_main, "serve one disk image over NBD (qemu-nbd syntax)"},
    {"vmstate", strata::cli::vmstate_main, "describe and check a saved migration stream"},
};

void print_usage(FILE* out) {
  std::fprintf(out, "usage: strata <command> [options]\n\ncommands:\n");
  for (const auto& sub : kSubCommands) {
    std::fprintf(out, "  %-8s %s\n", sub.name, sub.summary);
  }
  std::fprintf(out, "\nRun 'strata <command> --help' for the options of one command.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return 1;
  }
  std::string_view name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    print_usage(stdout);
    return 0;
  }
  if (name == "--version" || name == "-V") {
    std::printf("strata version 0.1.0\n");
    return 0;
  }
  for (const auto& sub : kSubCommands) {
    if (name == sub.name) {
      return sub.main(argc - 1, argv + 1);
    }
  }
  std::fprintf(stderr, "strata: unknown command '%s'\n\n", argv[1]);
  print_usage(stderr);
  return 1;
}
