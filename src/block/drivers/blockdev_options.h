#pragma once
// BlockdevOptions: the typed form of blockdev-add's argument (a flat union on `driver`), decoded
// completely before anything is opened so that argument errors come first and cost nothing
// (QEMU visits the whole QAPI object before opening).

#include <memory>
#include <optional>
#include <string>
#include <variant>

#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "base/result.h"
#include "block/graph/node.h"

namespace strata::block {

struct BlockdevOptions;

// A child given by reference (node name) or inline (options of a new node).
struct BlockdevRef {
  std::string node_name;                            // when referencing an existing node
  std::shared_ptr<BlockdevOptions> inline_options;  // when defining a new one
  bool is_null = false;                             // `null` (only where allowed, e.g. backing)
};

// Driver-specific members; each driver derives its own.
struct DriverOptions {
  virtual ~DriverOptions() = default;
};

struct BlockdevOptions {
  std::string driver;
  std::optional<std::string> node_name;
  std::optional<bool> read_only;
  std::optional<bool> auto_read_only;
  std::optional<bool> force_share;
  std::optional<bool> active;
  std::optional<std::string> discard;
  std::optional<std::string> detect_zeroes;
  std::optional<bool> cache_direct;
  std::optional<bool> cache_no_flush;
  std::unique_ptr<DriverOptions> driver_options;
  nlohmann::json json;  // the options as given, for pseudo-filenames and reopen

  // Resolves the common members, inheriting read-only, auto-read-only and cache settings from
  // `parent` where this (inline) node does not set them.
  CommonOptions resolve(const CommonOptions* parent) const;
};

// Decodes a BlockdevOptions object `object`; `d` is a decoder positioned on it. Records errors
// in `d` (and the decoders sharing its state); calls d.finish() for nested objects.
std::shared_ptr<BlockdevOptions> parse_blockdev_options(ArgDecoder& d,
                                                        const nlohmann::json& object);
// Decodes the BlockdevRef member `name` of `d` (string, object, or null when `allow_null`).
std::optional<BlockdevRef> parse_blockdev_ref(ArgDecoder& d, std::string_view name, bool required,
                                              bool allow_null = false);

}  // namespace strata::block
