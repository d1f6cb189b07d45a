#pragma once
// Entry points of strata's sub-commands. Each takes the arguments after the sub-command name
// (argv[0] is the sub-command itself) and returns the process exit code.

namespace strata::cli {

int daemon_main(int argc, char** argv);
int qmp_main(int argc, char** argv);
int img_main(int argc, char** argv);
int io_main(int argc, char** argv);
int nbd_main(int argc, char** argv);
int vmstate_main(int argc, char** argv);

}  // namespace strata::cli
