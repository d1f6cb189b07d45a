#include "block/drivers/blkdebug/config_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <utility>

namespace strata::block::blkdebug {

namespace {

constexpr size_t kLineBuffer = 1024;  // fgets buffer in qemu_config_foreach
constexpr size_t kQdictBuckets = 512;

Error invalid(const std::string& message) {
  return make_error(ErrorKind::kInvalidArgument, message);
}

// QEMU's tdb_hash (qobject/qdict.c).
uint32_t tdb_hash(const std::string& name) {
  uint32_t value = 0x238F13AFu * static_cast<uint32_t>(name.size());
  for (size_t i = 0; i < name.size(); ++i) {
    value += static_cast<uint32_t>(static_cast<unsigned char>(name[i])) << (i * 5 % 24);
  }
  return 1103515243u * value + 12345u;
}

bool is_space(char c) {
  return std::isspace(static_cast<unsigned char>(c)) != 0;
}

// sscanf's " %Ns": skips white space, then reads up to `max` non-space characters.
std::optional<std::string> scan_word(const std::string& line, size_t& pos, size_t max) {
  while (pos < line.size() && is_space(line[pos])) {
    ++pos;
  }
  size_t start = pos;
  while (pos < line.size() && !is_space(line[pos]) && pos - start < max) {
    ++pos;
  }
  if (pos == start) {
    return std::nullopt;
  }
  return line.substr(start, pos - start);
}

// sscanf's "%N[^c]": at least one character other than `stop`, up to `max`.
std::optional<std::string> scan_until(const std::string& line, size_t& pos, char stop, size_t max) {
  size_t start = pos;
  while (pos < line.size() && line[pos] != stop && pos - start < max) {
    ++pos;
  }
  if (pos == start) {
    return std::nullopt;
  }
  return line.substr(start, pos - start);
}

// sscanf's literal: white space in the format skips any white space, other characters must match.
bool scan_literal(const std::string& line, size_t& pos, char c) {
  if (c == ' ') {
    while (pos < line.size() && is_space(line[pos])) {
      ++pos;
    }
    return true;
  }
  if (pos < line.size() && line[pos] == c) {
    ++pos;
    return true;
  }
  return false;
}

struct Section {
  std::string group;
  // Entries in insertion order; a repeated key keeps its place and takes the new value.
  std::vector<std::pair<std::string, std::string>> entries;
};

void put(Section& section, const std::string& key, const std::string& value) {
  for (auto& entry : section.entries) {
    if (entry.first == key) {
      entry.second = value;
      return;
    }
  }
  section.entries.emplace_back(key, value);
}

// parse_option_number (util/qemu-option.c) over qemu_strtou64(value, NULL, 0).
Result<uint64_t> parse_number(const std::string& name, const std::string& value) {
  const char* start = value.c_str();
  char* end = nullptr;
  errno = 0;
  unsigned long long number = std::strtoull(start, &end, 0);
  if (errno == ERANGE) {
    return invalid("Value '" + value + "' is too large for parameter '" + name + "'");
  }
  if (end == start || *end != '\0' || errno != 0) {
    return invalid("Parameter '" + name + "' expects a number");
  }
  return static_cast<uint64_t>(number);
}

// qapi_bool_parse.
Result<bool> parse_bool(const std::string& name, const std::string& value) {
  if (value == "on" || value == "yes" || value == "true" || value == "y") {
    return true;
  }
  if (value == "off" || value == "no" || value == "false" || value == "n") {
    return false;
  }
  return invalid("Parameter '" + name + "' expects 'on' or 'off'");
}

bool id_wellformed(const std::string& id) {
  if (id.empty() || std::isalpha(static_cast<unsigned char>(id[0])) == 0) {
    return false;
  }
  return std::all_of(id.begin() + 1, id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '.' || c == '_';
  });
}

// config_parse_qdict for one section: the group must exist and every entry must be one of its
// options with a value of the option's type (checked in QDict order).
Result<RuleSpec> section_to_spec(const Section& section) {
  RuleSpec spec;
  if (section.group == "inject-error") {
    spec.action = Rule::Action::kInjectError;
  } else if (section.group == "set-state") {
    spec.action = Rule::Action::kSetState;
  } else {
    return invalid("There is no option group '" + section.group + "'");
  }
  std::vector<std::string> keys;
  std::map<std::string, std::string> values;
  for (const auto& [key, value] : section.entries) {
    keys.push_back(key);
    values[key] = value;
  }
  if (auto id = values.find("id"); id != values.end()) {
    if (!id_wellformed(id->second)) {
      return invalid("Parameter 'id' expects an identifier");
    }
    spec.id = id->second;
  }
  const bool inject = spec.action == Rule::Action::kInjectError;
  for (const std::string& key : qdict_order(keys)) {
    const std::string& value = values[key];
    std::optional<uint64_t>* number = nullptr;
    std::optional<bool>* flag = nullptr;
    if (key == "id") {
      continue;
    } else if (key == "event") {
      spec.event = value;
      continue;
    } else if (key == "state") {
      number = &spec.state;
    } else if (inject && key == "iotype") {
      spec.iotype = value;
      continue;
    } else if (inject && key == "errno") {
      number = &spec.errno_value;
    } else if (inject && key == "sector") {
      number = &spec.sector;
    } else if (inject && key == "once") {
      flag = &spec.once;
    } else if (inject && key == "immediately") {
      flag = &spec.immediately;
    } else if (!inject && key == "new_state") {
      number = &spec.new_state;
    } else {
      return invalid("Invalid parameter '" + key + "'");
    }
    if (number != nullptr) {
      auto parsed = parse_number(key, value);
      if (!parsed) {
        return std::move(parsed).error();
      }
      *number = *parsed;
    } else {
      auto parsed = parse_bool(key, value);
      if (!parsed) {
        return std::move(parsed).error();
      }
      *flag = *parsed;
    }
  }
  return spec;
}

}  // namespace

std::vector<std::string> qdict_order(const std::vector<std::string>& keys) {
  std::vector<std::pair<size_t, std::string>> ordered;  // (bucket, key), newest first per bucket
  for (auto it = keys.rbegin(); it != keys.rend(); ++it) {
    ordered.emplace_back(tdb_hash(*it) % kQdictBuckets, *it);
  }
  std::stable_sort(ordered.begin(), ordered.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::string> result;
  result.reserve(ordered.size());
  for (auto& entry : ordered) {
    result.push_back(std::move(entry.second));
  }
  return result;
}

Result<std::vector<RuleSpec>> read_config_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return invalid(std::string("Could not read blkdebug config file: ") + std::strerror(errno));
  }
  std::string text;
  std::array<char, 65536> buffer{};
  while (true) {
    ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      int saved = errno;
      ::close(fd);
      return invalid(std::string("Cannot read config file: ") + std::strerror(saved));
    }
    if (n == 0) {
      break;
    }
    text.append(buffer.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return parse_config_text(text);
}

Result<std::vector<RuleSpec>> parse_config_text(const std::string& text) {
  std::vector<RuleSpec> specs;
  std::optional<Section> current;
  auto finish_section = [&]() -> Result<void> {
    if (current) {
      auto spec = section_to_spec(*current);
      if (!spec) {
        return std::move(spec).error();
      }
      specs.push_back(std::move(*spec));
    }
    return ok();
  };

  size_t pos = 0;
  while (pos < text.size()) {
    // fgets(line, 1024): up to and including '\n', at most 1023 bytes.
    size_t newline = text.find('\n', pos);
    size_t end = newline == std::string::npos ? text.size() : newline + 1;
    end = std::min(end, pos + kLineBuffer - 1);
    const std::string line = text.substr(pos, end - pos);
    pos = end;

    if (line[0] == '\n' || line[0] == '#') {
      continue;
    }
    if (line[0] == '[') {
      // "[%63s \"%63[^\"]\"]", then "[%63[^]]]".
      std::optional<std::string> group;
      std::optional<std::string> id;
      size_t p = 1;
      auto word = scan_word(line, p, 63);
      if (word && scan_literal(line, p, ' ') && scan_literal(line, p, '"')) {
        if (auto value = scan_until(line, p, '"', 63)) {
          group = word;
          id = value;
        }
      }
      if (!group) {
        p = 1;
        group = scan_until(line, p, ']', 63);
      }
      if (group) {
        auto finished = finish_section();
        if (!finished) {
          return std::move(finished).error();
        }
        current = Section{*group, {}};
        if (id) {
          put(*current, "id", *id);
        }
        continue;
      }
    }
    // " %63s = \"%1023[^\"]\"" or " %63s = \"\"": any first word is a key.
    size_t p = 0;
    auto key = scan_word(line, p, 63);
    if (!key) {
      return invalid("parse error");
    }
    std::string value;
    if (scan_literal(line, p, ' ') && scan_literal(line, p, '=') && scan_literal(line, p, ' ') &&
        scan_literal(line, p, '"')) {
      value = scan_until(line, p, '"', 1023).value_or("");
    }
    if (!current) {
      return invalid("no group defined");
    }
    put(*current, *key, value);
  }
  auto finished = finish_section();
  if (!finished) {
    return std::move(finished).error();
  }
  return specs;
}

Result<std::vector<Rule>> make_rules(const std::vector<RuleSpec>& specs) {
  std::set<std::pair<Rule::Action, std::string>> ids;
  for (const RuleSpec& spec : specs) {
    if (spec.id && !ids.emplace(spec.action, *spec.id).second) {
      return invalid("Duplicate ID '" + *spec.id + "' for " +
                     (spec.action == Rule::Action::kInjectError ? "inject-error" : "set-state"));
    }
  }
  static constexpr std::array<std::string_view, 6> kIoTypes = {"read",    "write", "write-zeroes",
                                                               "discard", "flush", "block-status"};
  std::vector<Rule> rules;
  for (Rule::Action action : {Rule::Action::kInjectError, Rule::Action::kSetState}) {
    for (const RuleSpec& spec : specs) {
      if (spec.action != action) {
        continue;
      }
      if (!spec.event) {
        return invalid("Missing event name for rule");
      }
      auto event = parse_blkdebug_event(*spec.event);
      if (!event) {
        return invalid("invalid parameter value: " + *spec.event);
      }
      Rule rule;
      rule.action = action;
      rule.event = *event;
      // qemu_opt_get_number returns uint64_t; QEMU stores state/errno/new_state in an int.
      rule.state = static_cast<int>(spec.state.value_or(0));
      if (action == Rule::Action::kInjectError) {
        rule.error = static_cast<int>(spec.errno_value.value_or(EIO));
        rule.once = spec.once.value_or(false);
        rule.immediately = spec.immediately.value_or(false);
        const auto sector = static_cast<int64_t>(spec.sector.value_or(UINT64_MAX));
        rule.offset = sector == -1 ? -1 : static_cast<int64_t>(static_cast<uint64_t>(sector) * 512);
        if (spec.iotype) {
          auto found = std::find(kIoTypes.begin(), kIoTypes.end(), *spec.iotype);
          if (found == kIoTypes.end()) {
            return invalid("invalid parameter value: " + *spec.iotype);
          }
          rule.iotype_mask = uint64_t{1} << (found - kIoTypes.begin());
        }
      } else {
        rule.new_state = static_cast<int>(spec.new_state.value_or(0));
      }
      rules.push_back(rule);
    }
  }
  return rules;
}

}  // namespace strata::block::blkdebug
