// `strata qmp SOCKET` without a command: an interactive shell in the manner of QEMU's qmp-shell.
// Lines are "command key=value ..." or a raw JSON request; replies and events are printed whole.
// Events are shown when they arrive while a reply is awaited, and otherwise just before the next
// prompt (the shell does not interrupt line editing to print them).

#include <editline/readline.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>

#include "cli/qmp_client.h"

namespace strata::cli {
namespace {

constexpr const char kPrompt[] = "(QEMU) ";

std::string history_path() {
  const char* home = std::getenv("HOME");
  if (home == nullptr || *home == '\0') {
    return {};
  }
  return std::string(home) + "/.strata_qmp_history";
}

// One line of input without its newline, or nullopt at EOF. A terminal gets line editing and
// history; anything else is read plainly (the prompt is still printed, as qmp-shell does).
std::optional<std::string> read_line(bool interactive) {
  if (interactive) {
    char* raw = readline(kPrompt);
    if (raw == nullptr) {
      return std::nullopt;
    }
    std::string line(raw);
    std::free(raw);
    return line;
  }
  std::fputs(kPrompt, stdout);
  std::fflush(stdout);
  std::string line;
  if (!std::getline(std::cin, line)) {
    return std::nullopt;
  }
  return line;
}

std::string server_version(const Json& greeting) {
  try {
    const Json& qemu = greeting.at("QMP").at("version").at("qemu");
    return std::to_string(qemu.at("major").get<long long>()) + "." +
           std::to_string(qemu.at("minor").get<long long>()) + "." +
           std::to_string(qemu.at("micro").get<long long>());
  } catch (const Json::exception&) {
    return "(unknown version)";
  }
}

class Shell {
 public:
  Shell(QmpClient& client, const QmpOutputOptions& options, bool interactive)
      : client_(client), options_(options), interactive_(interactive) {}

  int run() {
    if (interactive_) {
      std::printf("Welcome to the strata QMP shell!\nConnected to QEMU %s\n\n",
                  server_version(client_.greeting()).c_str());
    }
    for (;;) {
      if (!drain_events()) {
        return connection_closed_exit_code();
      }
      std::optional<std::string> line = read_line(interactive_);
      if (!line.has_value()) {
        if (interactive_) {
          std::printf("\n");
        }
        // Show what arrived after the last reply before leaving.
        return drain_events() ? 0 : connection_closed_exit_code();
      }
      if (line->find_first_not_of(" \t\r") == std::string::npos) {
        continue;
      }
      if (interactive_) {
        add_history(line->c_str());
      }
      if (!run_line(*line)) {
        return connection_closed_exit_code();
      }
    }
  }

 private:
  void print(const Json& message) {
    std::printf("%s\n", format_json(message, options_.pretty).c_str());
    std::fflush(stdout);
  }

  // Prints the events already received; false when the connection is gone.
  bool drain_events() {
    for (;;) {
      auto message = client_.read_message(0);
      if (!message.ok()) {
        report_lost(message.error());
        return false;
      }
      if (!message->has_value()) {
        return true;
      }
      print(**message);
    }
  }

  // Sends one line's request and prints its reply; false when the connection is gone. Malformed
  // input is reported and sends nothing.
  bool run_line(const std::string& line) {
    std::string request;
    size_t first = line.find_first_not_of(" \t");
    if (line[first] == '{') {
      Json parsed = Json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (parsed.is_discarded() || !parsed.is_object()) {
        std::fprintf(stderr, "Error: not a JSON object: %s\n", line.c_str());
        return true;
      }
      request = line.substr(first);
      last_command_ = parsed.value("execute", std::string());
    } else {
      std::vector<std::string> words = split_command_line(line);
      std::vector<std::string> key_values(words.begin() + 1, words.end());
      auto built = build_request(words[0], key_values);
      if (!built.ok()) {
        std::fprintf(stderr, "Error while parsing command line: %s\n",
                     built.error().message().c_str());
        return true;
      }
      request = built->dump();
      last_command_ = words[0];
    }
    if (options_.verbose) {
      print(Json::parse(request));
    }
    auto reply = client_.execute_text(request, [this](const Json& event) { print(event); });
    if (!reply.ok()) {
      report_lost(reply.error());
      return false;
    }
    print(*reply);
    if (last_command_ == "quit") {
      quit_done_ = true;
    }
    return true;
  }

  void report_lost(const Error& error) {
    // After `quit` the server closing the connection is the expected outcome, even if another
    // request was already on its way.
    if (last_command_ != "quit" && !quit_done_) {
      std::fprintf(stderr, "strata qmp: %s\n", error.message().c_str());
      lost_unexpectedly_ = true;
    }
  }

  int connection_closed_exit_code() const { return lost_unexpectedly_ ? 1 : 0; }

  QmpClient& client_;
  const QmpOutputOptions& options_;
  bool interactive_;
  std::string last_command_;
  bool lost_unexpectedly_ = false;
  bool quit_done_ = false;
};

}  // namespace

int run_qmp_shell(QmpClient& client, const QmpOutputOptions& options) {
  const bool interactive = isatty(STDIN_FILENO) != 0;
  const std::string history = interactive ? history_path() : std::string();
  if (!history.empty()) {
    using_history();
    stifle_history(1000);
    read_history(history.c_str());  // a missing file is the normal first run
  }
  int exit_code = Shell(client, options, interactive).run();
  if (!history.empty()) {
    write_history(history.c_str());
  }
  return exit_code;
}

}  // namespace strata::cli
