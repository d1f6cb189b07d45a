#include "qmp/json_stream.h"

#include <array>
#include <cerrno>
#include <cstdlib>
#include <limits>
#include <utility>

#include <fmt/format.h>

#include "base/keyval.h"

namespace strata::qmp {
namespace {

// ---------------------------------------------------------------------------------------------
// Lexer: a transcription of QEMU's json-lexer.c state table (without interpolation).

enum LexerState : uint8_t {
  kJsonError = 0,  // JSON_ERROR; also the table's default entry
  kInRecovery,
  kInDqStringEscape,
  kInDqString,
  kInSqStringEscape,
  kInSqString,
  kInZero,
  kInExpDigits,
  kInExpSign,
  kInExpE,
  kInMantissa,
  kInMantissaDigits,
  kInDigits,
  kInSign,
  kInKeyword,
  kInStart,
};

enum TokenType : uint8_t {
  kLCurly = 100,
  kRCurly,
  kLSquare,
  kRSquare,
  kColon,
  kComma,
  kInteger,
  kFloat,
  kKeyword,
  kString,
  kEndOfInput,
};

constexpr uint8_t kLookahead = 0x80;

using LexerTable = std::array<std::array<uint8_t, 256>, kInStart + 1>;

constexpr void set_range(std::array<uint8_t, 256>& row, int first, int last, uint8_t value) {
  for (int c = first; c <= last; ++c) {
    row[static_cast<size_t>(c)] = value;
  }
}

constexpr void set(std::array<uint8_t, 256>& row, char c, uint8_t value) {
  row[static_cast<unsigned char>(c)] = value;
}

constexpr LexerTable make_lexer_table() {
  LexerTable t{};  // every entry JSON_ERROR, consuming the character

  // Error recovery: skip to a structural character, a control character other than '\t', or the
  // impossible UTF-8 bytes 0xFE/0xFF.
  auto& rec = t[kInRecovery];
  set_range(rec, 0, 0x1F, kInStart | kLookahead);
  set_range(rec, 0x20, 0xFD, kInRecovery);
  set_range(rec, 0xFE, 0xFF, kInStart | kLookahead);
  set(rec, '\t', kInRecovery);
  for (char c : {'[', ']', '{', '}', ':', ','}) {
    set(rec, c, kInStart | kLookahead);
  }

  set_range(t[kInDqStringEscape], 0x20, 0xFD, kInDqString);
  set_range(t[kInDqString], 0x20, 0xFD, kInDqString);
  set(t[kInDqString], '\\', kInDqStringEscape);
  set(t[kInDqString], '"', kString);

  set_range(t[kInSqStringEscape], 0x20, 0xFD, kInSqString);
  set_range(t[kInSqString], 0x20, 0xFD, kInSqString);
  set(t[kInSqString], '\\', kInSqStringEscape);
  set(t[kInSqString], '\'', kString);

  set_range(t[kInZero], 0, 0xFF, kInteger | kLookahead);
  set_range(t[kInZero], '0', '9', kJsonError);
  set(t[kInZero], '.', kInMantissa);

  set_range(t[kInExpDigits], 0, 0xFF, kFloat | kLookahead);
  set_range(t[kInExpDigits], '0', '9', kInExpDigits);

  set_range(t[kInExpSign], '0', '9', kInExpDigits);

  set(t[kInExpE], '-', kInExpSign);
  set(t[kInExpE], '+', kInExpSign);
  set_range(t[kInExpE], '0', '9', kInExpDigits);

  set_range(t[kInMantissaDigits], 0, 0xFF, kFloat | kLookahead);
  set_range(t[kInMantissaDigits], '0', '9', kInMantissaDigits);
  set(t[kInMantissaDigits], 'e', kInExpE);
  set(t[kInMantissaDigits], 'E', kInExpE);

  set_range(t[kInMantissa], '0', '9', kInMantissaDigits);

  set_range(t[kInDigits], 0, 0xFF, kInteger | kLookahead);
  set_range(t[kInDigits], '0', '9', kInDigits);
  set(t[kInDigits], 'e', kInExpE);
  set(t[kInDigits], 'E', kInExpE);
  set(t[kInDigits], '.', kInMantissa);

  set(t[kInSign], '0', kInZero);
  set_range(t[kInSign], '1', '9', kInDigits);

  set_range(t[kInKeyword], 0, 0xFF, kKeyword | kLookahead);
  set_range(t[kInKeyword], 'a', 'z', kInKeyword);

  auto& start = t[kInStart];
  set(start, '"', kInDqString);
  set(start, '\'', kInSqString);
  set(start, '0', kInZero);
  set_range(start, '1', '9', kInDigits);
  set(start, '-', kInSign);
  set(start, '{', kLCurly);
  set(start, '}', kRCurly);
  set(start, '[', kLSquare);
  set(start, ']', kRSquare);
  set(start, ',', kComma);
  set(start, ':', kColon);
  set_range(start, 'a', 'z', kInKeyword);
  for (char c : {' ', '\t', '\r', '\n'}) {
    set(start, c, kInStart);
  }
  return t;
}

constexpr LexerTable kLexerTable = make_lexer_table();

bool is_token_type(int type) {
  return type >= kLCurly && type <= kString;
}

// ---------------------------------------------------------------------------------------------
// Modified UTF-8 helpers from QEMU's util/unicode.c.

bool is_valid_codepoint(int64_t cp) {
  if (cp < 0 || cp > 0x10FFFF) {
    return false;
  }
  if ((cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE) {
    return false;  // noncharacter
  }
  if (cp >= 0xD800 && cp <= 0xDFFF) {
    return false;  // surrogate
  }
  return true;
}

// Decodes one modified-UTF-8 sequence of `s` at `pos`; returns the code point or -1, and
// advances `pos` past what was examined (mod_utf8_codepoint with n = 6).
int64_t mod_utf8_codepoint(const std::string& s, size_t& pos) {
  static constexpr int64_t kMinCp[5] = {0x80, 0x800, 0x10000, 0x200000, 0x4000000};
  auto at = [&](size_t i) -> unsigned {
    return i < s.size() ? static_cast<unsigned char>(s[i]) : 0u;
  };
  unsigned byte = at(pos);
  if (byte == 0) {
    return -1;
  }
  size_t p = pos + 1;
  int64_t cp;
  if (byte < 0x80) {
    cp = byte;
  } else if (byte >= 0xFE) {
    cp = -1;
  } else if ((byte & 0x40) == 0) {
    cp = -1;  // unexpected continuation byte
  } else {
    unsigned len = 0;
    unsigned mask = 0x80;
    for (; byte & mask; mask >>= 1) {
      ++len;
    }
    cp = byte & (mask - 1);
    for (unsigned i = 1; i < len; ++i) {
      unsigned next = i < 6 ? at(p) : 0;
      if ((next & 0xC0) != 0x80) {
        pos = p;
        return -1;  // continuation byte missing
      }
      ++p;
      cp = (cp << 6) | (next & 0x3F);
    }
    if (cp > 0x10FFFF) {
      cp = -1;
    } else if ((cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE) {
      cp = -1;
    } else if (cp >= 0xD800 && cp <= 0xDFFF) {
      cp = -1;
    } else if (cp < kMinCp[len - 2] && !(cp == 0 && len == 2)) {
      cp = -1;  // overlong, other than C0 80
    }
  }
  pos = p;
  return cp;
}

// Appends `cp` as UTF-8 (NUL stays a real NUL: QEMU's C0 80 goes out again as "\u0000").
void append_utf8(std::string& out, int64_t cp) {
  auto c = static_cast<uint32_t>(cp);
  if (c <= 0x7F) {
    out.push_back(static_cast<char>(c));
  } else if (c <= 0x7FF) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c <= 0xFFFF) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// Renders token bytes for an error message the way QEMU prints them: as a C string (up to the
// first NUL), and with invalid modified UTF-8 replaced by U+FFFD as QEMU's JSON writer does when it
// sends the message. The result is valid UTF-8 for our own writer.
std::string printable(std::string_view bytes) {
  std::string s(bytes.substr(0, bytes.find('\0')));
  std::string out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t before = pos;
    int64_t cp = mod_utf8_codepoint(s, pos);
    append_utf8(out, cp < 0 ? 0xFFFD : cp);
    if (pos == before) {
      ++pos;
    }
  }
  return out;
}

int hex_value(unsigned c) {
  if (c >= '0' && c <= '9') {
    return static_cast<int>(c - '0');
  }
  if (c >= 'a' && c <= 'f') {
    return static_cast<int>(c - 'a' + 10);
  }
  if (c >= 'A' && c <= 'F') {
    return static_cast<int>(c - 'A' + 10);
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Parser: json-parser.c over one message's tokens. Only the first error is kept, as in QEMU.

struct ParsedToken {
  int type;
  const std::string* text;
};

class TokenParser {
 public:
  TokenParser(const std::vector<ParsedToken>& tokens, size_t max_depth)
      : tokens_(tokens), max_depth_(max_depth) {}

  JsonMessage parse() {
    std::optional<nlohmann::json> value = parse_value(0);
    if (error_) {
      return Error(ErrorKind::kInvalidArgument, std::move(*error_));
    }
    if (!value) {
      return Error(ErrorKind::kInvalidArgument, "JSON parse error, expecting value");
    }
    return std::move(*value);
  }

 private:
  const ParsedToken* peek() const { return pos_ < tokens_.size() ? &tokens_[pos_] : nullptr; }
  const ParsedToken* pop() { return pos_ < tokens_.size() ? &tokens_[pos_++] : nullptr; }

  void parse_error(std::string message) {
    if (!error_) {
      error_ = "JSON parse error, " + std::move(message);
    }
  }

  std::optional<nlohmann::json> parse_value(size_t depth) {
    const ParsedToken* token = peek();
    if (token == nullptr) {
      parse_error("premature EOI");
      return std::nullopt;
    }
    // The streamer's nesting limit bounds depth already; this guard only protects the stack.
    if (depth > max_depth_ + 1) {
      parse_error("nesting too deep");
      return std::nullopt;
    }
    switch (token->type) {
      case kLCurly:
        return parse_object(depth);
      case kLSquare:
        return parse_array(depth);
      case kInteger:
      case kFloat:
      case kString:
        return parse_literal();
      case kKeyword:
        return parse_keyword();
      default:
        parse_error("expecting value");
        return std::nullopt;
    }
  }

  bool parse_pair(nlohmann::json& dict, size_t depth) {
    if (peek() == nullptr) {
      parse_error("premature EOI");
      return false;
    }
    std::optional<nlohmann::json> key = parse_value(depth);
    if (!key || !key->is_string()) {
      parse_error("key is not a string in object");
      return false;
    }
    const ParsedToken* token = pop();
    if (token == nullptr) {
      parse_error("premature EOI");
      return false;
    }
    if (token->type != kColon) {
      parse_error("missing : in object pair");
      return false;
    }
    std::optional<nlohmann::json> value = parse_value(depth);
    if (!value) {
      parse_error("Missing value in dict");
      return false;
    }
    const std::string& name = key->get_ref<const std::string&>();
    if (dict.contains(name)) {
      parse_error("duplicate key");
      return false;
    }
    dict[name] = std::move(*value);
    return true;
  }

  std::optional<nlohmann::json> parse_object(size_t depth) {
    pop();  // '{'
    nlohmann::json dict = nlohmann::json::object();
    const ParsedToken* peeked = peek();
    if (peeked == nullptr) {
      parse_error("premature EOI");
      return std::nullopt;
    }
    if (peeked->type == kRCurly) {
      pop();
      return dict;
    }
    if (!parse_pair(dict, depth + 1)) {
      return std::nullopt;
    }
    const ParsedToken* token = pop();
    if (token == nullptr) {
      parse_error("premature EOI");
      return std::nullopt;
    }
    while (token->type != kRCurly) {
      if (token->type != kComma) {
        parse_error("expected separator in dict");
        return std::nullopt;
      }
      if (!parse_pair(dict, depth + 1)) {
        return std::nullopt;
      }
      token = pop();
      if (token == nullptr) {
        parse_error("premature EOI");
        return std::nullopt;
      }
    }
    return dict;
  }

  std::optional<nlohmann::json> parse_array(size_t depth) {
    pop();  // '['
    nlohmann::json list = nlohmann::json::array();
    const ParsedToken* peeked = peek();
    if (peeked == nullptr) {
      parse_error("premature EOI");
      return std::nullopt;
    }
    if (peeked->type == kRSquare) {
      pop();
      return list;
    }
    std::optional<nlohmann::json> element = parse_value(depth + 1);
    if (!element) {
      parse_error("expecting value");
      return std::nullopt;
    }
    list.push_back(std::move(*element));
    const ParsedToken* token = pop();
    if (token == nullptr) {
      parse_error("premature EOI");
      return std::nullopt;
    }
    while (token->type != kRSquare) {
      if (token->type != kComma) {
        parse_error("expected separator in list");
        return std::nullopt;
      }
      element = parse_value(depth + 1);
      if (!element) {
        parse_error("expecting value");
        return std::nullopt;
      }
      list.push_back(std::move(*element));
      token = pop();
      if (token == nullptr) {
        parse_error("premature EOI");
        return std::nullopt;
      }
    }
    return list;
  }

  std::optional<nlohmann::json> parse_keyword() {
    const ParsedToken* token = pop();
    const std::string& word = *token->text;
    if (word == "true") {
      return nlohmann::json(true);
    }
    if (word == "false") {
      return nlohmann::json(false);
    }
    if (word == "null") {
      return nlohmann::json(nullptr);
    }
    parse_error(fmt::format("invalid keyword '{}'", word));
    return std::nullopt;
  }

  std::optional<nlohmann::json> parse_literal() {
    const ParsedToken* token = pop();
    const std::string& text = *token->text;
    switch (token->type) {
      case kString:
        return parse_string(text);
      case kInteger: {
        errno = 0;
        char* end = nullptr;
        long long value = std::strtoll(text.c_str(), &end, 10);
        if (errno == 0 && end != nullptr && *end == '\0') {
          return nlohmann::json(static_cast<int64_t>(value));
        }
        if (text[0] != '-') {
          errno = 0;
          unsigned long long uvalue = std::strtoull(text.c_str(), &end, 10);
          if (errno == 0 && end != nullptr && *end == '\0') {
            return nlohmann::json(static_cast<uint64_t>(uvalue));
          }
        }
        return nlohmann::json(std::strtod(text.c_str(), nullptr));
      }
      default:
        return nlohmann::json(std::strtod(text.c_str(), nullptr));
    }
  }

  // Four hex digits at `pos`, or -1 (QEMU's cvt4hex; stops at the first non-hex character).
  static int64_t cvt4hex(const std::string& s, size_t pos) {
    int64_t cp = 0;
    for (size_t i = 0; i < 4; ++i) {
      unsigned c = pos + i < s.size() ? static_cast<unsigned char>(s[pos + i]) : 0u;
      int digit = hex_value(c);
      if (digit < 0) {
        return -1;
      }
      cp = (cp << 4) | digit;
    }
    return cp;
  }

  std::optional<nlohmann::json> parse_string(const std::string& token) {
    auto at = [&](size_t i) -> char { return i < token.size() ? token[i] : '\0'; };
    const char quote = token[0];
    std::string out;
    size_t ptr = 1;
    while (ptr < token.size() && token[ptr] != quote) {
      if (token[ptr] == '\\') {
        size_t begin = ptr++;
        char escaped = at(ptr++);
        switch (escaped) {
          case '"':
          case '\'':
          case '\\':
          case '/':
            out.push_back(escaped);
            break;
          case 'b':
            out.push_back('\b');
            break;
          case 'f':
            out.push_back('\f');
            break;
          case 'n':
            out.push_back('\n');
            break;
          case 'r':
            out.push_back('\r');
            break;
          case 't':
            out.push_back('\t');
            break;
          case 'u': {
            int64_t cp = cvt4hex(token, ptr);
            ptr += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && at(ptr) == '\\' && at(ptr + 1) == 'u') {
              cp = 0x10000 + ((cp & 0x3FF) << 10);
              int64_t trailing = cvt4hex(token, ptr + 2);
              if (trailing >= 0xDC00 && trailing <= 0xDFFF) {
                cp |= trailing & 0x3FF;
                ptr += 6;
              } else {
                cp = -1;
              }
            }
            if (!is_valid_codepoint(cp)) {
              // QEMU prints "%.*s" from the backslash; the C string ends with the token.
              size_t len = std::min(ptr, token.size()) - begin;
              parse_error(fmt::format("{} is not a valid Unicode character",
                                      printable(std::string_view(token).substr(begin, len))));
              return std::nullopt;
            }
            append_utf8(out, cp);
            break;
          }
          default:
            parse_error("invalid escape sequence in string");
            return std::nullopt;
        }
      } else {
        int64_t cp = mod_utf8_codepoint(token, ptr);
        if (cp < 0) {
          parse_error("invalid UTF-8 sequence in string");
          return std::nullopt;
        }
        append_utf8(out, cp);
      }
    }
    return nlohmann::json(std::move(out));
  }

  const std::vector<ParsedToken>& tokens_;
  size_t max_depth_;
  size_t pos_ = 0;
  std::optional<std::string> error_;
};

}  // namespace

static_assert(JsonStreamParser::kStartState == kInStart);

void JsonStreamParser::feed(std::string_view bytes) {
  for (char ch : bytes) {
    feed_char(static_cast<unsigned char>(ch), false);
  }
}

void JsonStreamParser::flush() {
  feed_char(0, true);
  process_token(kEndOfInput);
}

std::optional<JsonMessage> JsonStreamParser::next() {
  if (ready_.empty()) {
    return std::nullopt;
  }
  JsonMessage message = std::move(ready_.front());
  ready_.pop_front();
  return message;
}

bool JsonStreamParser::in_message() const {
  return !tokens_.empty() || (state_ != kInStart && state_ != kInRecovery);
}

// json_lexer_feed_char(): runs the state machine until `ch` is consumed (or, when flushing, until
// the lexer is back in its start state), handing finished tokens to process_token().
void JsonStreamParser::feed_char(unsigned char ch, bool flush) {
  bool char_consumed = false;
  while (flush ? state_ != kInStart : !char_consumed) {
    uint8_t next = kLexerTable[static_cast<size_t>(state_)][ch];
    char_consumed = !flush && (next & kLookahead) == 0;
    int new_state = next & ~kLookahead;
    if (char_consumed) {
      token_.push_back(static_cast<char>(ch));
    }
    if (is_token_type(new_state)) {
      process_token(new_state);
      token_.clear();
      new_state = kInStart;
    } else if (new_state == kInStart) {
      token_.clear();
    } else if (new_state == kJsonError) {
      process_token(kJsonError);
      token_.clear();
      new_state = kInRecovery;
    } else if (new_state == kInRecovery) {
      token_.clear();
    }
    state_ = new_state;
  }

  // A single token may not grow without bound: hand it over as is; the streamer reports the
  // size limit.
  if (token_.size() > limits_.max_token_size) {
    process_token(state_);
    token_.clear();
    state_ = kInStart;
  }
}

void JsonStreamParser::emit_error(std::string message) {
  ready_.emplace_back(Error(ErrorKind::kInvalidArgument, std::move(message)));
}

// json_message_process_token(): tracks nesting to find the end of a message, enforces the
// limits, and parses a complete message.
void JsonStreamParser::process_token(int type) {
  auto reset = [this] {
    brace_count_ = 0;
    bracket_count_ = 0;
    tokens_.clear();
    token_size_ = 0;
  };
  switch (type) {
    case kLCurly:
      ++brace_count_;
      break;
    case kRCurly:
      --brace_count_;
      break;
    case kLSquare:
      ++bracket_count_;
      break;
    case kRSquare:
      --bracket_count_;
      break;
    case kJsonError:
      reset();
      emit_error(fmt::format("JSON parse error, stray '{}'", printable(token_)));
      return;
    case kEndOfInput:
      if (tokens_.empty()) {
        return;
      }
      ready_.push_back(parse_tokens());
      reset();
      return;
    default:
      break;
  }

  if (token_size_ + token_.size() + 1 > limits_.max_token_size) {
    reset();
    emit_error("JSON token size limit exceeded");
    return;
  }
  if (tokens_.size() + 1 > limits_.max_token_count) {
    reset();
    emit_error("JSON token count limit exceeded");
    return;
  }
  if (bracket_count_ + brace_count_ > static_cast<int64_t>(limits_.max_nesting)) {
    reset();
    emit_error("JSON nesting depth limit exceeded");
    return;
  }

  tokens_.push_back(Token{type, token_});
  token_size_ += token_.size();

  // QEMU tests bracket_count twice here (json-streamer.c), so a negative brace count does not
  // end a message while brackets are open; mirrored for identical message boundaries.
  if ((brace_count_ > 0 || bracket_count_ > 0) && bracket_count_ >= 0) {
    return;
  }
  ready_.push_back(parse_tokens());
  reset();
}

JsonMessage JsonStreamParser::parse_tokens() {
  try {
    std::vector<ParsedToken> tokens;
    tokens.reserve(tokens_.size());
    for (const Token& token : tokens_) {
      tokens.push_back(ParsedToken{token.type, &token.text});
    }
    return TokenParser(tokens, limits_.max_nesting).parse();
  } catch (const std::exception& e) {
    return Error(ErrorKind::kInvalidArgument, std::string("JSON parse error, ") + e.what());
  }
}

Result<nlohmann::json> parse_json_text(std::string_view text) {
  // qobject_from_json() reads a C string.
  text = text.substr(0, text.find('\0'));
  JsonStreamParser parser;
  parser.feed(text);
  parser.flush();
  std::optional<JsonMessage> first = parser.next();
  if (!first) {
    return Error(ErrorKind::kInvalidArgument, "Expecting a JSON value");
  }
  if (!first->ok()) {
    return std::move(*first);
  }
  if (parser.next()) {
    return Error(ErrorKind::kInvalidArgument, "Expecting at most one JSON value");
  }
  return std::move(*first);
}

Result<nlohmann::json> parse_keyval_or_json(std::string_view text, std::string_view implied_key) {
  if (option_is_json(text)) {
    return parse_json_text(text);
  }
  return parse_keyval(text, implied_key);
}

}  // namespace strata::qmp
