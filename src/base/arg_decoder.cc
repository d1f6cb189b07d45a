#include "base/arg_decoder.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>

#include <fmt/format.h>

namespace strata {
namespace {

const nlohmann::json& empty_object() {
  static const nlohmann::json kEmpty = nlohmann::json::object();
  return kEmpty;
}

bool is_space(char c) {
  return c == ' ' || (c >= '\t' && c <= '\r');
}

// qemu_strtoi64(str, NULL, 0, &value): strtoll rules (leading space, sign, 0x hex, 0 octal), the
// whole string must be used.
std::optional<int64_t> parse_i64(const std::string& text) {
  if (text.find('\0') != std::string::npos) {
    return std::nullopt;
  }
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 0);
  if (errno != 0 || end == text.c_str() || *end != '\0') {
    return std::nullopt;
  }
  return static_cast<int64_t>(value);
}

// qemu_strtou64(str, NULL, 0, &value): strtoull rules; a leading '-' negates (wraps) as strtoull
// does.
std::optional<uint64_t> parse_u64(const std::string& text, int base = 0) {
  if (text.find('\0') != std::string::npos) {
    return std::nullopt;
  }
  errno = 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text.c_str(), &end, base);
  if (errno != 0 || end == text.c_str() || *end != '\0') {
    return std::nullopt;
  }
  return static_cast<uint64_t>(value);
}

uint64_t suffix_multiplier(char suffix) {
  switch (suffix) {
    case 'B':
    case 'b':
      return 1;
    case 'K':
    case 'k':
      return uint64_t{1} << 10;
    case 'M':
    case 'm':
      return uint64_t{1} << 20;
    case 'G':
    case 'g':
      return uint64_t{1} << 30;
    case 'T':
    case 't':
      return uint64_t{1} << 40;
    case 'P':
    case 'p':
      return uint64_t{1} << 50;
    case 'E':
    case 'e':
      return uint64_t{1} << 60;
    default:
      return 0;
  }
}

}  // namespace

std::optional<uint64_t> parse_size(std::string_view input) {
  std::string text(input);
  if (text.find('\0') != std::string::npos) {
    return std::nullopt;
  }
  size_t pos = 0;
  while (pos < text.size() && is_space(text[pos])) {
    ++pos;
  }
  if (pos < text.size() && (text[pos] == '-' || text[pos] == '+')) {
    return std::nullopt;  // parse_uint() rejects signs
  }
  size_t digits_start = pos;
  while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
    ++pos;
  }
  const bool have_integral = pos > digits_start;
  // Hex: "0x..." with neither fraction nor suffix.
  if (have_integral && pos - digits_start == 1 && text[digits_start] == '0' && pos < text.size() &&
      (text[pos] == 'x' || text[pos] == 'X')) {
    std::optional<uint64_t> value = parse_u64(text.substr(digits_start), 16);
    return value;  // any suffix or fraction leaves trailing characters and fails
  }
  uint64_t integral = 0;
  if (have_integral) {
    std::optional<uint64_t> value = parse_u64(text.substr(digits_start, pos - digits_start), 10);
    if (!value) {
      return std::nullopt;  // out of range
    }
    integral = *value;
  }
  long double fraction = 0;
  bool have_fraction_digits = false;
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    long double scale = 0.1L;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
      fraction += scale * (text[pos] - '0');
      scale /= 10;
      have_fraction_digits = true;
      ++pos;
    }
  }
  if (!have_integral && !have_fraction_digits) {
    return std::nullopt;
  }
  uint64_t multiplier = 1;
  if (pos < text.size()) {
    multiplier = suffix_multiplier(text[pos]);
    if (multiplier == 0) {
      return std::nullopt;
    }
    ++pos;
  }
  if (pos != text.size()) {
    return std::nullopt;
  }
  if (multiplier == 1) {
    if (fraction != 0) {
      return std::nullopt;  // a fraction needs a scale
    }
    return integral;
  }
  unsigned __int128 whole = static_cast<unsigned __int128>(integral) * multiplier;
  // Round half up, like QEMU's 64.64 fixed-point computation.
  auto fractional =
      static_cast<unsigned __int128>(fraction * static_cast<long double>(multiplier) + 0.5L);
  whole += fractional;
  if (whole > std::numeric_limits<uint64_t>::max()) {
    return std::nullopt;
  }
  return static_cast<uint64_t>(whole);
}

ArgDecoder::ArgDecoder(const nlohmann::json& object, std::string path, bool keyval)
    : ArgDecoder(object, std::move(path), keyval, std::make_shared<Shared>()) {}

ArgDecoder::ArgDecoder(const nlohmann::json& object, std::string path, bool keyval,
                       std::shared_ptr<Shared> shared)
    : object_(&object), path_(std::move(path)), keyval_(keyval), shared_(std::move(shared)) {}

bool ArgDecoder::failed() const {
  return shared_->error.has_value();
}

void ArgDecoder::fail(Error e) {
  if (!shared_->error) {
    shared_->error = std::move(e);
  }
}

void ArgDecoder::fail_message(std::string message) {
  fail(Error(ErrorKind::kInvalidArgument, std::move(message)));
}

std::string ArgDecoder::full_name(std::string_view name) const {
  if (path_.empty()) {
    return std::string(name);
  }
  return fmt::format("{}.{}", path_, name);
}

std::string ArgDecoder::element_name(size_t index, std::string_view list_name) const {
  return keyval_ ? fmt::format("{}.{}", full_name(list_name), index)
                 : fmt::format("{}[{}]", full_name(list_name), index);
}

bool ArgDecoder::has(std::string_view name) const {
  return object_->is_object() && object_->find(name) != object_->end();
}

const nlohmann::json* ArgDecoder::member(std::string_view name, bool required) {
  if (failed()) {
    return nullptr;
  }
  const nlohmann::json* found = nullptr;
  if (object_->is_object()) {
    auto it = object_->find(name);
    if (it != object_->end()) {
      found = &*it;
      if (std::find(consumed_.begin(), consumed_.end(), name) == consumed_.end()) {
        consumed_.emplace_back(name);
      }
    }
  }
  if (found == nullptr && required) {
    fail_message(fmt::format("Parameter '{}' is missing", full_name(name)));
  }
  return found;
}

const std::string* ArgDecoder::keyval_string(const nlohmann::json& value, const std::string& full) {
  if (value.is_string()) {
    return &value.get_ref<const std::string&>();
  }
  if (value.is_object() || value.is_array()) {
    fail_message(fmt::format("Parameters '{}.*' are unexpected", full));
  } else {
    fail_message(fmt::format("Internal error: parameter {} invalid", full));
  }
  return nullptr;
}

std::optional<std::string> ArgDecoder::to_str(const nlohmann::json& value,
                                              const std::string& full) {
  if (keyval_) {
    const std::string* text = keyval_string(value, full);
    return text != nullptr ? std::optional<std::string>(*text) : std::nullopt;
  }
  if (!value.is_string()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: string", full));
    return std::nullopt;
  }
  return value.get<std::string>();
}

std::optional<int64_t> ArgDecoder::to_i64(const nlohmann::json& value, const std::string& full) {
  if (keyval_) {
    const std::string* text = keyval_string(value, full);
    if (text == nullptr) {
      return std::nullopt;
    }
    std::optional<int64_t> parsed = parse_i64(*text);
    if (!parsed) {
      fail_message(fmt::format("Parameter '{}' expects integer", full));
    }
    return parsed;
  }
  if (value.is_number_integer() && !value.is_number_unsigned()) {
    return value.get<int64_t>();
  }
  if (value.is_number_unsigned() &&
      value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return static_cast<int64_t>(value.get<uint64_t>());
  }
  fail_message(fmt::format("Invalid parameter type for '{}', expected: integer", full));
  return std::nullopt;
}

std::optional<uint64_t> ArgDecoder::to_u64(const nlohmann::json& value, const std::string& full) {
  if (keyval_) {
    const std::string* text = keyval_string(value, full);
    if (text == nullptr) {
      return std::nullopt;
    }
    std::optional<uint64_t> parsed = parse_u64(*text);
    if (!parsed) {
      fail_message(fmt::format("Parameter '{}' expects integer", full));
    }
    return parsed;
  }
  if (value.is_number_unsigned()) {
    return value.get<uint64_t>();
  }
  if (value.is_number_integer()) {
    // Negative values are accepted and cast for backward compatibility (QEMU does the same).
    return static_cast<uint64_t>(value.get<int64_t>());
  }
  fail_message(fmt::format("Parameter '{}' expects uint64", full));
  return std::nullopt;
}

std::optional<uint64_t> ArgDecoder::to_size(const nlohmann::json& value, const std::string& full) {
  if (!keyval_) {
    return to_u64(value, full);  // the JSON visitor has no size method: uint64 rules
  }
  const std::string* text = keyval_string(value, full);
  if (text == nullptr) {
    return std::nullopt;
  }
  std::optional<uint64_t> parsed = parse_size(*text);
  if (!parsed) {
    fail_message(fmt::format("Parameter '{}' expects size", full));
  }
  return parsed;
}

std::optional<bool> ArgDecoder::to_bool(const nlohmann::json& value, const std::string& full) {
  if (keyval_) {
    const std::string* text = keyval_string(value, full);
    if (text == nullptr) {
      return std::nullopt;
    }
    // qapi_bool_parse()
    if (*text == "on" || *text == "yes" || *text == "true" || *text == "y") {
      return true;
    }
    if (*text == "off" || *text == "no" || *text == "false" || *text == "n") {
      return false;
    }
    fail_message(fmt::format("Parameter '{}' expects 'on' or 'off'", full));
    return std::nullopt;
  }
  if (!value.is_boolean()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: boolean", full));
    return std::nullopt;
  }
  return value.get<bool>();
}

std::optional<double> ArgDecoder::to_number(const nlohmann::json& value, const std::string& full) {
  if (keyval_) {
    const std::string* text = keyval_string(value, full);
    if (text == nullptr) {
      return std::nullopt;
    }
    // qemu_strtod_finite(): the whole string, finite result.
    errno = 0;
    char* end = nullptr;
    double parsed = std::strtod(text->c_str(), &end);
    if (errno != 0 || end == text->c_str() || *end != '\0' || !std::isfinite(parsed) ||
        text->find('\0') != std::string::npos) {
      fail_message(fmt::format("Invalid parameter type for '{}', expected: number", full));
      return std::nullopt;
    }
    return parsed;
  }
  if (!value.is_number()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: number", full));
    return std::nullopt;
  }
  return value.get<double>();
}

std::optional<std::string> ArgDecoder::to_enum(const nlohmann::json& value, const std::string& full,
                                               std::string_view bare,
                                               std::span<const std::string_view> allowed) {
  std::optional<std::string> text = to_str(value, full);
  if (!text) {
    return std::nullopt;
  }
  if (std::find(allowed.begin(), allowed.end(), *text) == allowed.end()) {
    fail_message(fmt::format("Parameter '{}' does not accept value '{}'", bare, *text));
    return std::nullopt;
  }
  return text;
}

std::string ArgDecoder::str(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_str(*value, full_name(name)).value_or("") : "";
}

std::optional<std::string> ArgDecoder::opt_str(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_str(*value, full_name(name)) : std::nullopt;
}

int64_t ArgDecoder::i64(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_i64(*value, full_name(name)).value_or(0) : 0;
}

std::optional<int64_t> ArgDecoder::opt_i64(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_i64(*value, full_name(name)) : std::nullopt;
}

uint64_t ArgDecoder::u64(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_u64(*value, full_name(name)).value_or(0) : 0;
}

std::optional<uint64_t> ArgDecoder::opt_u64(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_u64(*value, full_name(name)) : std::nullopt;
}

uint64_t ArgDecoder::size(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_size(*value, full_name(name)).value_or(0) : 0;
}

std::optional<uint64_t> ArgDecoder::opt_size(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_size(*value, full_name(name)) : std::nullopt;
}

bool ArgDecoder::boolean(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_bool(*value, full_name(name)).value_or(false) : false;
}

std::optional<bool> ArgDecoder::opt_bool(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_bool(*value, full_name(name)) : std::nullopt;
}

double ArgDecoder::number(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_number(*value, full_name(name)).value_or(0.0) : 0.0;
}

std::optional<double> ArgDecoder::opt_number(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_number(*value, full_name(name)) : std::nullopt;
}

std::string ArgDecoder::enumeration(std::string_view name,
                                    std::span<const std::string_view> allowed) {
  const nlohmann::json* value = member(name, true);
  return value != nullptr ? to_enum(*value, full_name(name), name, allowed).value_or("") : "";
}

std::optional<std::string> ArgDecoder::opt_enum(std::string_view name,
                                                std::span<const std::string_view> allowed) {
  const nlohmann::json* value = member(name, false);
  return value != nullptr ? to_enum(*value, full_name(name), name, allowed) : std::nullopt;
}

std::optional<ArgDecoder> ArgDecoder::opt_object(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  if (value == nullptr) {
    return std::nullopt;
  }
  if (!value->is_object()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: object", full_name(name)));
    return ArgDecoder(empty_object(), full_name(name), keyval_, shared_);
  }
  return ArgDecoder(*value, full_name(name), keyval_, shared_);
}

ArgDecoder ArgDecoder::object(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  if (value == nullptr) {
    return ArgDecoder(empty_object(), full_name(name), keyval_, shared_);
  }
  if (!value->is_object()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: object", full_name(name)));
    return ArgDecoder(empty_object(), full_name(name), keyval_, shared_);
  }
  return ArgDecoder(*value, full_name(name), keyval_, shared_);
}

const nlohmann::json* ArgDecoder::opt_any(std::string_view name) {
  return member(name, false);
}

std::optional<std::vector<nlohmann::json>> ArgDecoder::opt_list(std::string_view name) {
  const nlohmann::json* value = member(name, false);
  if (value == nullptr) {
    return std::nullopt;
  }
  if (!value->is_array()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: array", full_name(name)));
    return std::nullopt;
  }
  return value->get<std::vector<nlohmann::json>>();
}

std::vector<nlohmann::json> ArgDecoder::list(std::string_view name) {
  const nlohmann::json* value = member(name, true);
  if (value == nullptr) {
    return {};
  }
  if (!value->is_array()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: array", full_name(name)));
    return {};
  }
  return value->get<std::vector<nlohmann::json>>();
}

std::optional<std::vector<std::string>> ArgDecoder::opt_str_list(std::string_view name) {
  std::optional<std::vector<nlohmann::json>> elements = opt_list(name);
  if (!elements) {
    return std::nullopt;
  }
  std::vector<std::string> result;
  for (size_t i = 0; i < elements->size() && !failed(); ++i) {
    result.push_back(element_str((*elements)[i], i, name));
  }
  return result;
}

std::optional<std::vector<std::string>> ArgDecoder::opt_enum_list(
    std::string_view name, std::span<const std::string_view> allowed) {
  std::optional<std::vector<nlohmann::json>> elements = opt_list(name);
  if (!elements) {
    return std::nullopt;
  }
  std::vector<std::string> result;
  for (size_t i = 0; i < elements->size() && !failed(); ++i) {
    result.push_back(element_enum((*elements)[i], i, name, allowed));
  }
  return result;
}

ArgDecoder ArgDecoder::element_decoder(const nlohmann::json& element, size_t index,
                                       std::string_view list_name) {
  std::string name = element_name(index, list_name);
  if (!failed() && !element.is_object()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: object", name));
  }
  return ArgDecoder(element.is_object() ? element : empty_object(), std::move(name), keyval_,
                    shared_);
}

ArgDecoder ArgDecoder::nested(const nlohmann::json& object, std::string_view name) {
  if (!failed() && !object.is_object()) {
    fail_message(fmt::format("Invalid parameter type for '{}', expected: object", full_name(name)));
  }
  return ArgDecoder(object.is_object() ? object : empty_object(), full_name(name), keyval_,
                    shared_);
}

std::string ArgDecoder::element_str(const nlohmann::json& element, size_t index,
                                    std::string_view list_name) {
  if (failed()) {
    return "";
  }
  return to_str(element, element_name(index, list_name)).value_or("");
}

std::string ArgDecoder::element_enum(const nlohmann::json& element, size_t index,
                                     std::string_view list_name,
                                     std::span<const std::string_view> allowed) {
  if (failed()) {
    return "";
  }
  // QEMU's enum check names list elements 'null' (they have no member name).
  return to_enum(element, element_name(index, list_name), "null", allowed).value_or("");
}

Result<void> ArgDecoder::finish() {
  if (!failed() && object_->is_object()) {
    for (auto it = object_->begin(); it != object_->end(); ++it) {
      if (std::find(consumed_.begin(), consumed_.end(), it.key()) == consumed_.end()) {
        fail_message(fmt::format("Parameter '{}' is unexpected", full_name(it.key())));
        break;
      }
    }
  }
  if (shared_->error) {
    return *shared_->error;
  }
  return ok();
}

}  // namespace strata
