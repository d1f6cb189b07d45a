#include <cstdio>

#include "cli/commands.h"

namespace strata::cli {
int daemon_main(int, char**) {
  std::fprintf(stderr, "strata daemon: not built yet\n");
  return 1;
}
}  // namespace strata::cli
