#pragma once
// QEMU's KEY=VALUE,... option syntax (util/keyval.c, QEMU 10.0), used by the daemon's
// --blockdev/--export/--nbd-server/--object/--chardev/--monitor options:
//
//   key-vals     = [ key-val { ',' key-val } [ ',' ] ]
//   key-val      = key '=' val
//   key          = key-fragment { '.' key-fragment }
//   val          = { / [^,]* / | ',,' }
//
// Dotted keys build nested objects; all-numeric fragments (after the first) build lists, which
// must have no gaps (`a.0=x,a.1=y`). The last of several key-vals naming the same leaf wins. With
// an implied key, the first element may be a bare value (`nbd,id=e0` = `type=nbd,id=e0`); that
// value cannot contain ',' or '='. Leaves are always strings: typing happens when the result is
// decoded (ArgDecoder with keyval = true). Errors carry QEMU's texts, e.g.
// "Invalid parameter 'foo..bar'", "Expected '=' after parameter 'x'",
// "Parameters 'a.*' used inconsistently", "Parameter 'a.0' missing".
//
// The input is read as a C string: anything from the first NUL on is ignored, as on a command line.

#include <string_view>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace strata {

struct KeyvalParse {
  nlohmann::json object;  // always a JSON object
  bool help = false;      // an element was "help" or "?"
};

// Parses `text`; `implied_key` empty means none. "help"/"?" elements are reported in `help`
// instead of failing (QEMU's keyval_parse with a non-null p_help).
Result<KeyvalParse> parse_keyval_with_help(std::string_view text,
                                           std::string_view implied_key = {});

// Parses `text`; a "help"/"?" element fails with "Help is not available for this option".
Result<nlohmann::json> parse_keyval(std::string_view text, std::string_view implied_key = {});

}  // namespace strata
