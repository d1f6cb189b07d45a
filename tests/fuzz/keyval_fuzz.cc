// Parses arbitrary text as a --blockdev style option (keyval or JSON) and decodes the result with
// ArgDecoder the way a command would: typed getters over every member, nested objects and lists.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/arg_decoder.h"
#include "base/keyval.h"
#include "qmp/json_stream.h"

namespace {

constexpr std::array<std::string_view, 3> kEnum = {"on", "off", "unmap"};

void decode(strata::ArgDecoder& d, const nlohmann::json& object, int depth) {
  if (!object.is_object() || depth > 8) {
    return;
  }
  size_t i = 0;
  for (auto it = object.begin(); it != object.end(); ++it, ++i) {
    const std::string& name = it.key();
    switch ((i + static_cast<size_t>(depth)) % 9) {
      case 0:
        (void)d.opt_str(name);
        break;
      case 1:
        (void)d.opt_i64(name);
        break;
      case 2:
        (void)d.opt_u64(name);
        break;
      case 3:
        (void)d.opt_size(name);
        break;
      case 4:
        (void)d.opt_bool(name);
        break;
      case 5:
        (void)d.opt_enum(name, kEnum);
        break;
      case 6:
        (void)d.opt_number(name);
        break;
      case 7: {
        if (auto child = d.opt_object(name)) {
          decode(*child, *it, depth + 1);
          strata::ignore_error(child->finish(), "the parent reports it");
        }
        break;
      }
      default: {
        if (auto list = d.opt_list(name)) {
          for (size_t k = 0; k < list->size(); ++k) {
            const nlohmann::json& element = (*list)[k];
            if (element.is_object()) {
              strata::ArgDecoder e = d.element_decoder(element, k, name);
              decode(e, element, depth + 1);
              strata::ignore_error(e.finish(), "the parent reports it");
            } else {
              (void)d.element_enum(element, k, name, kEnum);
            }
          }
        }
        break;
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  for (std::string_view implied : {std::string_view{}, std::string_view{"driver"}}) {
    strata::Result<nlohmann::json> parsed = strata::qmp::parse_keyval_or_json(text, implied);
    if (!parsed.ok()) {
      (void)parsed.error().message().size();
      continue;
    }
    const nlohmann::json& object = parsed.value();
    if (!object.is_object()) {
      __builtin_trap();  // both syntaxes must yield an object
    }
    strata::ArgDecoder d(object, "", !strata::qmp::option_is_json(text));
    decode(d, object, 0);
    strata::Result<void> result = d.finish();
    // Command-line bytes need not be UTF-8; like QEMU's writer, replace invalid sequences.
    constexpr auto kReplace = nlohmann::json::error_handler_t::replace;
    if (!result.ok()) {
      (void)nlohmann::json(result.error().message()).dump(-1, ' ', false, kReplace);
    }
    (void)object.dump(-1, ' ', false, kReplace);
  }
  (void)strata::parse_size(text);
  return 0;
}
