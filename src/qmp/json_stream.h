#pragma once
// Streaming JSON input for QMP, behaving like QEMU's json-lexer.c + json-streamer.c +
// json-parser.c (QEMU 10.0): bytes go in as they arrive from the socket, complete top-level
// values (or parse errors carrying QEMU's exact texts) come out.
//
// Guarantees: feed(), flush() and next() never throw and never crash on any input. After an error
// the parser resynchronises exactly like QEMU: the lexer skips input until a structural character
// ({ } [ ] : ,), an ASCII control character other than '\t', or a byte 0xFE/0xFF. Clients use a
// control character or 0xFF to force a known-good state (docs/interop/qmp-spec.rst).
//
// QEMU's extensions are accepted: single-quoted strings and the \' escape. Integers that do not fit
// int64 become uint64 if they fit, else double (QEMU's QNum rules). \u0000 and the modified-UTF-8
// sequence C0 80 decode to a NUL character.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace strata::qmp {

// One top-level JSON value, or the error QEMU would report for the bytes that were meant to be one
// (always ErrorKind::kInvalidArgument, i.e. a GenericError reply without "id").
using JsonMessage = Result<nlohmann::json>;

// QEMU's per-message security limits (json-streamer.c). Tests may lower them.
struct JsonLimits {
  size_t max_token_size = size_t{64} << 20;  // bytes in one message's tokens
  size_t max_token_count = size_t{2} << 20;  // tokens in one message
  size_t max_nesting = size_t{1} << 10;      // open braces + brackets
};

class JsonStreamParser {
 public:
  JsonStreamParser() = default;
  explicit JsonStreamParser(JsonLimits limits) : limits_(limits) {}

  // Consumes `bytes`; any number of messages may become available through next().
  void feed(std::string_view bytes);
  // End of input: a pending scalar or unterminated value is finished (QEMU's
  // json_message_parser_flush), e.g. `{"a":` yields "JSON parse error, premature EOI".
  void flush();
  // The oldest message not yet returned, if any.
  std::optional<JsonMessage> next();
  // True while part of a message has been received but not yet completed.
  bool in_message() const;

  static constexpr int kStartState = 15;  // IN_START of the lexer table in json_stream.cc

 private:
  struct Token {
    int type;
    std::string text;
  };

  void feed_char(unsigned char ch, bool flush);
  void process_token(int type);
  void emit_error(std::string message);
  JsonMessage parse_tokens();

  JsonLimits limits_;
  // Lexer state (json-lexer.c).
  int state_ = kStartState;
  std::string token_;
  // Streamer state (json-streamer.c).
  int64_t brace_count_ = 0;
  int64_t bracket_count_ = 0;
  size_t token_size_ = 0;
  std::vector<Token> tokens_;
  std::deque<JsonMessage> ready_;
};

// Parses exactly one JSON value from `text` like QEMU's qobject_from_json(): "Expecting a JSON
// value" for none, "Expecting at most one JSON value" for several, else the first parse error.
Result<nlohmann::json> parse_json_text(std::string_view text);

// The value of a --blockdev/--export/--object style option: JSON when it starts with '{' (texts of
// parse_json_text()), else keyval (base/keyval.h) with `implied_key` ("" for none). Decode a JSON
// result with ArgDecoder keyval = false and a keyval result with keyval = true (option_is_json()).
Result<nlohmann::json> parse_keyval_or_json(std::string_view text, std::string_view implied_key);
inline bool option_is_json(std::string_view text) {
  return !text.empty() && text[0] == '{';
}

}  // namespace strata::qmp
