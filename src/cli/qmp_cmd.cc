#include <cstdio>

#include "cli/commands.h"

namespace strata::cli {
int qmp_main(int, char**) {
  std::fprintf(stderr, "strata qmp: not built yet\n");
  return 1;
}
}  // namespace strata::cli
