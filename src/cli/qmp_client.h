#pragma once
// The client side of QMP for `strata qmp`: a blocking unix-socket connection that negotiates
// capabilities and exchanges one JSON object per line, plus qmp-shell's "command key=value ..."
// request syntax. Independent of the daemon: it talks to any QMP server (strata, QEMU, QSD).

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace strata::cli {

// Server key order is kept so that output reads like the server's.
using Json = nlohmann::ordered_json;

class QmpClient {
 public:
  // Connects to the unix socket at `path`, reads the greeting (waiting at most
  // `greeting_timeout_ms`; a QEMU monitor serves one client at a time and greets the next only when
  // the previous leaves) and negotiates with qmp_capabilities. Errors are ready to print: "cannot
  // connect to ...", "no QMP greeting ...", "qmp_capabilities failed: ...".
  static Result<QmpClient> connect(const std::string& path, int greeting_timeout_ms = 10000);

  QmpClient(QmpClient&& other) noexcept;
  QmpClient& operator=(QmpClient&& other) noexcept;
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;
  ~QmpClient();

  const Json& greeting() const { return greeting_; }

  // Writes `text` (one JSON object; a newline is appended) in full.
  Result<void> send_text(std::string_view text);
  Result<void> send(const Json& message) { return send_text(message.dump()); }

  // The next complete message. Waits up to `timeout_ms` (< 0: forever, 0: only what has already
  // arrived); nullopt when none is complete by then. Messages are the server's \n-terminated lines
  // (QEMU ends them with \r\n); several may arrive in one read and one may span several reads.
  // kProtocol error when the server closed the connection or sent a line that is not JSON.
  Result<std::optional<Json>> read_message(int timeout_ms);

  // Sends `request` and waits for its reply (the first message that is not an event); events read
  // meanwhile go to `on_event` in arrival order. The reply is returned whether it is a success or
  // an error reply.
  Result<Json> execute_text(std::string_view request,
                            const std::function<void(const Json&)>& on_event);
  Result<Json> execute(const Json& request, const std::function<void(const Json&)>& on_event) {
    return execute_text(request.dump(), on_event);
  }

 private:
  explicit QmpClient(int fd) : fd_(fd) {}
  std::optional<Json> take_buffered_line(Result<void>& parse_result);

  int fd_ = -1;
  std::string buffer_;  // bytes received but not yet returned as messages
  Json greeting_;
};

// ---- request syntax (python/qemu/qmp/qmp_shell.py) --------------------------------------------

// Splits a shell line into words at whitespace; a quoted part ('...' or "...", backslash escapes
// inside) may contain whitespace and keeps its quotes, so that `file="a b"` stays one word whose
// value is the JSON string "a b".
std::vector<std::string> split_command_line(std::string_view line);

// A value: valid JSON (number, true/false, null, "string", object, array) is taken as JSON,
// anything else is the literal text.
Json parse_value(const std::string& text);

// Builds the arguments object from key=value words; dotted keys nest (`file.driver=file` →
// {"file": {"driver": "file"}}). Errors use qmp-shell's wording ("Expected a key=value pair, got
// 'x'", "Cannot set \"k\" multiple times", "Cannot use \"a\" as both leaf and non-leaf key").
Result<Json> parse_key_values(const std::vector<std::string>& words);

// {"execute": command, "arguments": {...}} (arguments left out when there are none).
Result<Json> build_request(const std::string& command, const std::vector<std::string>& key_values);

// ---- output ------------------------------------------------------------------------------------

struct QmpOutputOptions {
  bool pretty = true;    // 2-space indented JSON, else one line
  bool verbose = false;  // one-shot: events to stderr; shell: echo each request
};

// `value` as text: 2-space indented or one line; invalid UTF-8 is replaced, never thrown on.
std::string format_json(const Json& value, bool pretty);

// The interactive shell (qmp_shell.cc): reads lines until EOF, returns the exit code.
int run_qmp_shell(QmpClient& client, const QmpOutputOptions& options);

}  // namespace strata::cli
