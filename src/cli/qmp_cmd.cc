// `strata qmp`: a QMP client, one-shot or interactive (qmp_shell.cc).

#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "cli/commands.h"
#include "cli/qmp_client.h"

namespace strata::cli {
namespace {

constexpr const char kUsage[] =
    "usage: strata qmp [options] SOCKET [COMMAND [key=value ...]]\n"
    "\n"
    "Connects to the QMP monitor listening on the unix socket SOCKET and negotiates capabilities.\n"
    "With COMMAND, runs it and prints its return value; without, starts an interactive shell\n"
    "(prompt '(QEMU) ', lines 'command key=value ...' or a raw JSON object; Ctrl-D leaves).\n"
    "\n"
    "Arguments: a value that is valid JSON (42, true, null, \"text\", {...}, [...]) is taken as "
    "JSON,\n"
    "anything else as a string; dotted keys nest: file.driver=file -> {\"file\": {\"driver\": "
    "\"file\"}}.\n"
    "COMMAND may also be a whole JSON request ('{\"execute\": ...}'), sent as is.\n"
    "\n"
    "options:\n"
    "  -p, --pretty    indented JSON output (default)\n"
    "  -c, --compact   one-line JSON output\n"
    "  -v, --verbose   one-shot: print events that arrive before the reply to stderr;\n"
    "                  shell: echo each request before sending it\n"
    "  -h, --help      this text\n"
    "\n"
    "Exit status: 0 on success, 1 on an error reply or when the connection fails.\n";

// Runs one command; its `return` goes to stdout, an error reply to stderr.
int run_one_shot(QmpClient& client, const std::string& command,
                 const std::vector<std::string>& key_values, const QmpOutputOptions& options) {
  std::string request;
  if (!command.empty() && command[0] == '{') {
    if (!key_values.empty()) {
      std::fprintf(stderr, "strata qmp: a raw JSON request takes no key=value arguments\n");
      return 1;
    }
    Json parsed = Json::parse(command, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded() || !parsed.is_object()) {
      std::fprintf(stderr, "strata qmp: the request is not a JSON object: %s\n", command.c_str());
      return 1;
    }
    request = command;
  } else {
    auto built = build_request(command, key_values);
    if (!built.ok()) {
      std::fprintf(stderr, "strata qmp: %s\n", built.error().message().c_str());
      return 1;
    }
    request = built->dump();
  }

  auto reply = client.execute_text(request, [&](const Json& event) {
    if (options.verbose) {
      std::fprintf(stderr, "%s\n", format_json(event, false).c_str());
    }
  });
  if (!reply.ok()) {
    std::fprintf(stderr, "strata qmp: %s\n", reply.error().message().c_str());
    return 1;
  }
  if (reply->contains("error")) {
    const Json& error = (*reply)["error"];
    std::string desc = error.is_object() ? error.value("desc", std::string()) : std::string();
    std::string error_class =
        error.is_object() ? error.value("class", std::string("GenericError")) : "GenericError";
    std::fprintf(stderr, "error: %s (%s)\n", desc.c_str(), error_class.c_str());
    return 1;
  }
  if (!reply->contains("return")) {
    std::fprintf(stderr, "strata qmp: unexpected reply: %s\n", format_json(*reply, false).c_str());
    return 1;
  }
  std::string text = format_json((*reply)["return"], options.pretty);
  std::fprintf(stdout, "%s\n", text.c_str());
  return 0;
}

}  // namespace

int qmp_main(int argc, char** argv) {
  QmpOutputOptions options;
  std::string socket_path;
  std::string command;
  std::vector<std::string> key_values;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (!command.empty()) {
      key_values.emplace_back(arg);
      continue;
    }
    if (!options_done && arg.size() > 1 && arg[0] == '-') {
      if (arg == "--") {
        options_done = true;
      } else if (arg == "-p" || arg == "--pretty") {
        options.pretty = true;
      } else if (arg == "-c" || arg == "--compact") {
        options.pretty = false;
      } else if (arg == "-v" || arg == "--verbose") {
        options.verbose = true;
      } else if (arg == "-h" || arg == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
      } else {
        std::fprintf(stderr, "strata qmp: unknown option '%s'\n\n%s", argv[i], kUsage);
        return 1;
      }
      continue;
    }
    if (socket_path.empty()) {
      socket_path = arg;
    } else {
      command = arg;
      if (command.empty()) {
        std::fprintf(stderr, "strata qmp: empty command name\n");
        return 1;
      }
    }
  }
  if (socket_path.empty()) {
    std::fprintf(stderr, "strata qmp: missing SOCKET\n\n%s", kUsage);
    return 1;
  }

  auto client = QmpClient::connect(socket_path);
  if (!client.ok()) {
    std::fprintf(stderr, "strata qmp: %s\n", client.error().message().c_str());
    return 1;
  }
  if (command.empty()) {
    return run_qmp_shell(*client, options);
  }
  return run_one_shot(*client, command, key_values, options);
}

}  // namespace strata::cli
