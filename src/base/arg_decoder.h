#pragma once
// Typed decoding of QMP arguments and command-line options with the messages of QEMU 10.0's QAPI
// input visitor (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c).
//
// Usage: construct on the arguments object, call one getter per known member in schema order,
// descend with object()/element_decoder(), call finish() on every nested decoder when done with it
// and on the top-level one last. The first error in visiting order wins; once an error is
// recorded every getter returns a default and the decoders sharing it do nothing more.
//
// Message shapes (full names use QEMU's `a.b[0].c` notation; `a.b.0.c` in keyval mode):
//   "Parameter 'x' is missing", "Parameter 'x' is unexpected",
//   "Invalid parameter type for 'x', expected: string|integer|boolean|number|object|array",
//   "Parameter 'x' expects uint64" (JSON uint64/size), "Parameter 'x' expects integer|size|'on' or
//   'off'" (keyval conversions), "Parameters 'x.*' are unexpected" (keyval: object where a scalar
//   belongs), "Parameter 'x' does not accept value 'y'" (enums; QEMU uses the bare member name
//   here, and 'null' for list elements).
//
// The decoder holds pointers into the JSON it was given: that JSON must outlive it.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace strata {

class ArgDecoder {
 public:
  // `object` is the arguments object (or a nested object); `path` is the prefix used in messages
  // ("" at top level, "options[0]" or "file" for nested ones); keyval = true means scalars arrive
  // as strings (command line) and are converted the way QEMU's keyval visitor does.
  ArgDecoder(const nlohmann::json& object, std::string path = "", bool keyval = false);

  // Scalars. Required getters record "Parameter 'x' is missing" when absent; optional ones return
  // nullopt only when the member is absent (a present null is a type error, as in QEMU).
  std::string str(std::string_view name);
  std::optional<std::string> opt_str(std::string_view name);
  int64_t i64(std::string_view name);
  std::optional<int64_t> opt_i64(std::string_view name);
  // JSON: accepts negative integers and casts them (QEMU keeps this for compatibility).
  uint64_t u64(std::string_view name);
  std::optional<uint64_t> opt_u64(std::string_view name);
  // QAPI 'size': like uint64 in JSON; keyval accepts suffixes (k, M, G, T, P, E; 1.5G) and 0x hex.
  uint64_t size(std::string_view name);
  std::optional<uint64_t> opt_size(std::string_view name);
  bool boolean(std::string_view name);
  std::optional<bool> opt_bool(std::string_view name);
  double number(std::string_view name);
  std::optional<double> opt_number(std::string_view name);

  // Enums: the value must be one of `allowed`.
  std::string enumeration(std::string_view name, std::span<const std::string_view> allowed);
  std::optional<std::string> opt_enum(std::string_view name,
                                      std::span<const std::string_view> allowed);

  // Nested objects. On error the returned decoder is inert (empty object, shares the error).
  std::optional<ArgDecoder> opt_object(std::string_view name);
  ArgDecoder object(std::string_view name);

  // The raw member (alternates such as BlockdevRef = string | object | null); marks it consumed.
  const nlohmann::json* opt_any(std::string_view name);

  // Lists: the elements (checked to be an array), to be decoded with the element helpers below.
  std::optional<std::vector<nlohmann::json>> opt_list(std::string_view name);
  std::vector<nlohmann::json> list(std::string_view name);
  // Convenience for list<str> and list<enum>.
  std::optional<std::vector<std::string>> opt_str_list(std::string_view name);
  std::optional<std::vector<std::string>> opt_enum_list(std::string_view name,
                                                        std::span<const std::string_view> allowed);

  // A decoder for the object at `list_name[index]` ("list_name.index" in keyval mode); records
  // "Invalid parameter type for 'list[3]', expected: object" if the element is not an object.
  ArgDecoder element_decoder(const nlohmann::json& element, size_t index,
                             std::string_view list_name);
  // A decoder for an object member already fetched with opt_any() (alternates such as
  // BlockdevRef given inline); path `name` below this decoder's, same shared error state.
  ArgDecoder nested(const nlohmann::json& object, std::string_view name);
  // Scalar list elements.
  std::string element_str(const nlohmann::json& element, size_t index, std::string_view list_name);
  std::string element_enum(const nlohmann::json& element, size_t index, std::string_view list_name,
                           std::span<const std::string_view> allowed);

  bool has(std::string_view name) const;

  // Reports "Parameter 'x' is unexpected" for the first member no getter consumed (in the
  // object's order), unless an earlier error was recorded; returns the first error recorded by
  // this decoder or any decoder sharing its state (parents, children).
  Result<void> finish();
  bool failed() const;
  // Records a command's own semantic error in visiting order (ignored if one is recorded already).
  void fail(Error e);

  // Helpers for commands that decode alternates themselves.
  std::string full_name(std::string_view name) const;
  const std::string& path() const { return path_; }
  bool keyval() const { return keyval_; }

 private:
  struct Shared {
    std::optional<Error> error;
  };

  ArgDecoder(const nlohmann::json& object, std::string path, bool keyval,
             std::shared_ptr<Shared> shared);

  // The member `name`, marked consumed; nullptr if absent. Records "is missing" when `required`.
  const nlohmann::json* member(std::string_view name, bool required);
  void fail_message(std::string message);
  std::string element_name(size_t index, std::string_view list_name) const;

  // Scalar conversions on an already-fetched value; `full` is the name used in messages, `bare`
  // the one QEMU's enum check uses.
  std::optional<std::string> to_str(const nlohmann::json& value, const std::string& full);
  std::optional<int64_t> to_i64(const nlohmann::json& value, const std::string& full);
  std::optional<uint64_t> to_u64(const nlohmann::json& value, const std::string& full);
  std::optional<uint64_t> to_size(const nlohmann::json& value, const std::string& full);
  std::optional<bool> to_bool(const nlohmann::json& value, const std::string& full);
  std::optional<double> to_number(const nlohmann::json& value, const std::string& full);
  std::optional<std::string> to_enum(const nlohmann::json& value, const std::string& full,
                                     std::string_view bare,
                                     std::span<const std::string_view> allowed);
  // keyval: the string leaf, or an error for objects/lists.
  const std::string* keyval_string(const nlohmann::json& value, const std::string& full);

  const nlohmann::json* object_;
  std::string path_;
  bool keyval_;
  std::vector<std::string> consumed_;
  std::shared_ptr<Shared> shared_;
};

// QEMU's qemu_strtosz(): a byte count with an optional binary suffix (B, K, M, G, T, P, E; any
// case), a fraction when scaled ("1.5k"), or 0x hex without suffix. nullopt if invalid or too big.
std::optional<uint64_t> parse_size(std::string_view text);

}  // namespace strata
