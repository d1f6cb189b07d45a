#include "base/keyval.h"

#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace strata {
namespace {

constexpr size_t kMaxFragment = 127;  // key_in_cur[128] in keyval.c

bool is_ascii_alpha(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
bool is_ascii_digit(char c) {
  return c >= '0' && c <= '9';
}
bool is_ascii_alnum(char c) {
  return is_ascii_alpha(c) || is_ascii_digit(c);
}

// A list index: all leading decimal digits, capped at INT_MAX (keyval.c key_to_index). Returns -1
// when `s` does not start with a digit. `digits` receives how many characters were used.
int64_t key_to_index(std::string_view s, size_t& digits) {
  if (s.empty() || !is_ascii_digit(s[0])) {
    return -1;
  }
  int64_t index = 0;
  digits = 0;
  while (digits < s.size() && is_ascii_digit(s[digits])) {
    if (index < INT_MAX) {
      index = index * 10 + (s[digits] - '0');
    }
    ++digits;
  }
  return index < INT_MAX ? index : INT_MAX;
}

// Whole-string variant: -1 unless `s` is all digits.
int64_t key_to_index(std::string_view s) {
  size_t digits = 0;
  int64_t index = key_to_index(s, digits);
  return index >= 0 && digits == s.size() ? index : -1;
}

// Length of the QAPI name at the start of `s` (qapi-util.c parse_qapi_name, complete = false),
// or -1. Names may carry a downstream "__RFQDN_" prefix.
int64_t parse_qapi_name(std::string_view s) {
  size_t p = 0;
  auto at = [&](size_t i) { return i < s.size() ? s[i] : '\0'; };
  if (at(p) == '_') {
    ++p;
    if (at(p) != '_') {
      return -1;
    }
    while (true) {
      ++p;
      char c = at(p);
      if (c == '\0' || (!is_ascii_alnum(c) && c != '-' && c != '.')) {
        break;
      }
    }
    if (at(p) != '_') {
      return -1;
    }
    ++p;
  }
  if (!is_ascii_alpha(at(p))) {
    return -1;
  }
  while (true) {
    ++p;
    char c = at(p);
    if (c == '\0' || (!is_ascii_alnum(c) && c != '-' && c != '_')) {
      break;
    }
  }
  return static_cast<int64_t>(p);
}

Error keyval_error(std::string message) {
  return Error(ErrorKind::kInvalidArgument, std::move(message));
}

// keyval_parse_put(): makes `cur[key_in_cur]` an object (value == nullptr) or the string `value`.
Result<nlohmann::json*> put(nlohmann::json& cur, const std::string& key_in_cur,
                            const std::string* value, std::string_view key_so_far) {
  auto it = cur.find(key_in_cur);
  if (it != cur.end()) {
    bool want_string = value != nullptr;
    if (it->is_string() != want_string) {
      return keyval_error(fmt::format("Parameters '{}.*' used inconsistently", key_so_far));
    }
    if (!want_string) {
      return &*it;
    }
    *it = *value;  // the last one wins
    return &*it;
  }
  nlohmann::json& slot = cur[key_in_cur];
  slot = value != nullptr ? nlohmann::json(*value) : nlohmann::json::object();
  return &slot;
}

bool is_help_option(std::string_view element) {
  return element == "?" || element == "help";
}

// keyval_parse_one(): parses the key-val at `pos` into `root`; returns the position of the next
// key-val.
Result<size_t> parse_one(nlohmann::json& root, std::string_view params, size_t pos,
                         std::string_view implied_key, bool& help) {
  std::string_view rest = params.substr(pos);
  size_t len = rest.find_first_of("=,");
  if (len == std::string_view::npos) {
    len = rest.size();
  }
  std::string_view key = rest;
  bool implied = false;
  size_t value_end = 0;
  if (len != 0 && (len == rest.size() || rest[len] != '=')) {
    if (is_help_option(rest.substr(0, len))) {
      help = true;
      size_t next = pos + len;
      if (next < params.size() && params[next] == ',') {
        ++next;
      }
      return next;
    }
    if (!implied_key.empty()) {
      implied = true;
      value_end = len;
      key = implied_key;
      len = implied_key.size();
    }
  }
  const size_t key_end = len;

  // Fragments: `s` indexes the current fragment of `key`; `key_in_cur` holds the previous one.
  nlohmann::json* cur = &root;
  size_t s = 0;
  std::string key_in_cur;
  while (true) {
    size_t frag_len = 0;
    size_t digits = 0;
    if (s != 0 && key_to_index(key.substr(s), digits) >= 0) {
      frag_len = digits;
    } else {
      int64_t name_len = parse_qapi_name(key.substr(s));
      frag_len = name_len < 0 ? 0 : static_cast<size_t>(name_len);
    }
    if (frag_len == 0 || (s + frag_len < key_end && key[s + frag_len] != '.') ||
        s + frag_len > key_end) {
      return keyval_error(fmt::format("Invalid parameter '{}'", key.substr(0, key_end)));
    }
    if (frag_len > kMaxFragment) {
      bool fragment = s != 0 || s + frag_len != key_end;
      return keyval_error(fmt::format("Parameter{} '{}' is too long", fragment ? " fragment" : "",
                                      key.substr(s, frag_len)));
    }
    if (s != 0) {
      Result<nlohmann::json*> next = put(*cur, key_in_cur, nullptr, key.substr(0, s - 1));
      if (!next.ok()) {
        return std::move(next).error();
      }
      cur = *next;
    }
    key_in_cur = std::string(key.substr(s, frag_len));
    s += frag_len;
    if (s >= key.size() || key[s] != '.') {
      break;
    }
    ++s;
  }

  std::string value;
  size_t next;
  if (implied) {
    value = std::string(rest.substr(0, value_end));
    next = pos + value_end;
    if (next < params.size() && params[next] == ',') {
      ++next;
    }
  } else {
    if (s >= key.size() || key[s] != '=') {
      return keyval_error(fmt::format("Expected '=' after parameter '{}'", key.substr(0, s)));
    }
    next = pos + s + 1;
    while (next < params.size()) {
      if (params[next] == ',') {
        ++next;
        if (next >= params.size() || params[next] != ',') {
          break;
        }
      }
      value.push_back(params[next++]);
    }
  }
  Result<nlohmann::json*> stored = put(*cur, key_in_cur, &value, key.substr(0, key_end));
  if (!stored.ok()) {
    return std::move(stored).error();
  }
  return next;
}

std::string reassemble_key(const std::vector<std::string>& key_of_cur) {
  std::string key;
  for (const std::string& fragment : key_of_cur) {
    key += fragment;
    key += '.';
  }
  return key;
}

// keyval_listify(): replaces objects whose keys are all list indexes by arrays, recursively.
Result<void> listify(nlohmann::json& cur, std::vector<std::string>& key_of_cur) {
  bool has_index = false;
  bool has_member = false;
  for (auto it = cur.begin(); it != cur.end(); ++it) {
    if (key_to_index(it.key()) >= 0) {
      has_index = true;
    } else {
      has_member = true;
    }
    if (!it->is_object()) {
      continue;
    }
    key_of_cur.push_back(it.key());
    Result<void> nested = listify(*it, key_of_cur);
    key_of_cur.pop_back();
    if (!nested.ok()) {
      return nested;
    }
  }

  if (has_index && has_member) {
    return keyval_error(
        fmt::format("Parameters '{}*' used inconsistently", reassemble_key(key_of_cur)));
  }
  if (!has_index) {
    return ok();
  }

  // Indexes need not be distinct ("1" and "01"); the last one iterated wins, and any index at or
  // beyond the member count shows up as a gap.
  const size_t nelt = cur.size();
  std::vector<const nlohmann::json*> elements(nelt, nullptr);
  int64_t max_index = -1;
  for (auto it = cur.begin(); it != cur.end(); ++it) {
    int64_t index = key_to_index(it.key());
    max_index = std::max(max_index, index);
    if (static_cast<size_t>(index) < nelt) {
      elements[static_cast<size_t>(index)] = &*it;
    }
  }
  nlohmann::json list = nlohmann::json::array();
  const int64_t count = std::min(static_cast<int64_t>(nelt) + 1, max_index + 1);
  for (int64_t i = 0; i < count; ++i) {
    if (static_cast<size_t>(i) >= nelt || elements[static_cast<size_t>(i)] == nullptr) {
      return keyval_error(fmt::format("Parameter '{}{}' missing", reassemble_key(key_of_cur), i));
    }
    list.push_back(*elements[static_cast<size_t>(i)]);
  }
  cur = std::move(list);
  return ok();
}

// keyval_parse_into(): `allow_help` false fails on "help" before lists are built, as QEMU does.
Result<KeyvalParse> parse(std::string_view text, std::string_view implied_key, bool allow_help) {
  try {
    std::string_view params = text.substr(0, text.find('\0'));
    KeyvalParse result{nlohmann::json::object(), false};
    size_t pos = 0;
    while (pos < params.size()) {
      Result<size_t> next = parse_one(result.object, params, pos, implied_key, result.help);
      if (!next.ok()) {
        return std::move(next).error();
      }
      pos = *next;
      implied_key = {};
    }
    if (result.help && !allow_help) {
      return keyval_error("Help is not available for this option");
    }
    std::vector<std::string> key_of_cur;
    Result<void> listified = listify(result.object, key_of_cur);
    if (!listified.ok()) {
      return std::move(listified).error();
    }
    return result;
  } catch (const std::exception& e) {
    return keyval_error(e.what());
  }
}

}  // namespace

Result<KeyvalParse> parse_keyval_with_help(std::string_view text, std::string_view implied_key) {
  return parse(text, implied_key, true);
}

Result<nlohmann::json> parse_keyval(std::string_view text, std::string_view implied_key) {
  Result<KeyvalParse> parsed = parse(text, implied_key, false);
  if (!parsed.ok()) {
    return std::move(parsed).error();
  }
  return std::move(parsed->object);
}

}  // namespace strata
