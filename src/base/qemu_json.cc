#include "base/qemu_json.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <vector>

namespace strata {

namespace {

// QDict's hash (qobject/qdict.c tdb_hash) and bucket count.
constexpr uint32_t kBuckets = 512;
uint32_t bucket_of(std::string_view key) {
  uint32_t value = 0x238F13AFu * static_cast<uint32_t>(key.size());
  for (size_t i = 0; i < key.size(); ++i) {
    value += static_cast<uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  }
  return (1103515243u * value + 12345u) % kBuckets;
}

// The order QAPI visits members (struct declaration order): within a bucket the member visited
// later is found first. Keys not listed are treated as visited after these, alphabetically.
constexpr std::string_view kVisitOrder[] = {
    // BlockNodeInfo / ImageInfo, then BlockGraphInfo's children
    "filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size", "encrypted",
    "compressed", "backing-filename", "full-backing-filename", "backing-filename-format",
    "snapshots", "format-specific", "backing-image", "children",
    // BlockChildInfo
    "name", "info",
    // ImageInfoSpecific
    "type", "data",
    // ImageInfoSpecificQCow2
    "compat", "data-file", "data-file-raw", "extended-l2", "lazy-refcounts", "corrupt",
    "refcount-bits", "encrypt", "bitmaps", "compression-type",
    // Qcow2BitmapInfo ("name" is listed above)
    "granularity", "flags"};

size_t visit_rank(std::string_view key) {
  const auto* found = std::find(std::begin(kVisitOrder), std::end(kVisitOrder), key);
  return static_cast<size_t>(found - std::begin(kVisitOrder));
}

std::vector<std::string> ordered_keys(const nlohmann::json& object) {
  std::vector<std::string> keys;
  for (const auto& item : object.items()) {
    keys.push_back(item.key());
  }
  std::stable_sort(keys.begin(), keys.end(), [](const std::string& a, const std::string& b) {
    uint32_t bucket_a = bucket_of(a);
    uint32_t bucket_b = bucket_of(b);
    if (bucket_a != bucket_b) {
      return bucket_a < bucket_b;
    }
    size_t rank_a = visit_rank(a);
    size_t rank_b = visit_rank(b);
    if (rank_a != rank_b) {
      return rank_a > rank_b;
    }
    return a > b;
  });
  return keys;
}

// QEMU's quoted_str: escapes ", \, control characters, and non-ASCII as \uXXXX.
void append_string(std::string& out, const std::string& text) {
  out += '"';
  size_t i = 0;
  while (i < text.size()) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    char buffer[16];
    switch (c) {
      case '"':
        out += "\\\"";
        ++i;
        continue;
      case '\\':
        out += "\\\\";
        ++i;
        continue;
      case '\b':
        out += "\\b";
        ++i;
        continue;
      case '\f':
        out += "\\f";
        ++i;
        continue;
      case '\n':
        out += "\\n";
        ++i;
        continue;
      case '\r':
        out += "\\r";
        ++i;
        continue;
      case '\t':
        out += "\\t";
        ++i;
        continue;
      default:
        break;
    }
    if (c < 0x20 || c == 0x7f) {
      std::snprintf(buffer, sizeof(buffer), "\\u%04X", c);
      out += buffer;
      ++i;
      continue;
    }
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // Decode one UTF-8 sequence; invalid bytes become U+FFFD as in QEMU.
    uint32_t code = 0xFFFD;
    size_t length = 1;
    if ((c & 0xE0) == 0xC0 && i + 1 < text.size()) {
      code = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(text[i + 1]) & 0x3Fu);
      length = 2;
    } else if ((c & 0xF0) == 0xE0 && i + 2 < text.size()) {
      code = ((c & 0x0Fu) << 12) | ((static_cast<unsigned char>(text[i + 1]) & 0x3Fu) << 6) |
             (static_cast<unsigned char>(text[i + 2]) & 0x3Fu);
      length = 3;
    } else if ((c & 0xF8) == 0xF0 && i + 3 < text.size()) {
      code = ((c & 0x07u) << 18) | ((static_cast<unsigned char>(text[i + 1]) & 0x3Fu) << 12) |
             ((static_cast<unsigned char>(text[i + 2]) & 0x3Fu) << 6) |
             (static_cast<unsigned char>(text[i + 3]) & 0x3Fu);
      length = 4;
    }
    if (code >= 0x10000) {
      code -= 0x10000;
      std::snprintf(buffer, sizeof(buffer), "\\u%04X\\u%04X", 0xD800 + (code >> 10),
                    0xDC00 + (code & 0x3FF));
    } else {
      std::snprintf(buffer, sizeof(buffer), "\\u%04X", code);
    }
    out += buffer;
    i += length;
  }
  out += '"';
}

void append_scalar(std::string& out, const nlohmann::json& value) {
  char buffer[64];
  if (value.is_string()) {
    append_string(out, value.get<std::string>());
  } else if (value.is_boolean()) {
    out += value.get<bool>() ? "true" : "false";
  } else if (value.is_number_unsigned()) {
    std::snprintf(buffer, sizeof(buffer), "%" PRIu64, value.get<uint64_t>());
    out += buffer;
  } else if (value.is_number_integer()) {
    std::snprintf(buffer, sizeof(buffer), "%" PRId64, value.get<int64_t>());
    out += buffer;
  } else if (value.is_number_float()) {
    std::snprintf(buffer, sizeof(buffer), "%.17g", value.get<double>());
    out += buffer;
  } else {
    out += "null";
  }
}

// JSONWriter: every member or element starts on a new line indented by depth (pretty), or after
// ", " (compact); containers close on their own line.
void write(std::string& out, const nlohmann::json& value, bool pretty, int depth) {
  auto newline = [&](int level) {
    if (pretty) {
      out += '\n';
      out.append(static_cast<size_t>(4 * level), ' ');
    }
  };
  if (value.is_object() || value.is_array()) {
    const bool object = value.is_object();
    out += object ? '{' : '[';
    bool first = true;
    auto separator = [&] {
      if (!first) {
        out += ',';
        if (!pretty) {
          out += ' ';
        }
      }
      first = false;
      newline(depth + 1);
    };
    if (object) {
      for (const auto& key : ordered_keys(value)) {
        separator();
        append_string(out, key);
        out += ": ";
        write(out, value.at(key), pretty, depth + 1);
      }
    } else {
      for (const auto& element : value) {
        separator();
        write(out, element, pretty, depth + 1);
      }
    }
    newline(depth);
    out += object ? '}' : ']';
    return;
  }
  append_scalar(out, value);
}

void dump(std::string& out, const nlohmann::json& value, int indentation);

void dump_entry(std::string& out, const std::string& label, const nlohmann::json& value,
                int indentation) {
  const bool composite = value.is_object() || value.is_array();
  out.append(static_cast<size_t>(indentation * 4), ' ');
  out += label;
  out += ':';
  out += composite ? '\n' : ' ';
  dump(out, value, indentation + 1);
  if (!composite) {
    out += '\n';
  }
}

void dump(std::string& out, const nlohmann::json& value, int indentation) {
  if (value.is_object()) {
    for (const auto& key : ordered_keys(value)) {
      std::string label = key;
      std::replace(label.begin(), label.end(), '-', ' ');
      dump_entry(out, label, value.at(key), indentation);
    }
  } else if (value.is_array()) {
    int index = 0;
    for (const auto& element : value) {
      dump_entry(out, "[" + std::to_string(index++) + "]", element, indentation);
    }
  } else if (value.is_string()) {
    out += value.get<std::string>();
  } else {
    append_scalar(out, value);
  }
}

}  // namespace

std::string qemu_json(const nlohmann::json& value, bool pretty) {
  std::string out;
  write(out, value, pretty, 0);
  return out;
}

std::string qemu_dump_object(const nlohmann::json& value, int indentation) {
  std::string out;
  dump(out, value, indentation);
  return out;
}

}  // namespace strata
