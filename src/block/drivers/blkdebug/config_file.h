#pragma once
// blkdebug rule specifications: the `config` file (QEMU's ini format read by qemu_config_parse,
// util/qemu-config.c) and the QMP `inject-error`/`set-state` lists, both turned into Rules with
// QEMU's checks and messages (blkdebug.c add_rule, util/qemu-option.c).
//
// The file format, as QEMU reads it: lines are read 1023 bytes at a time; a line starting with '#'
// or an empty line is skipped; `[group]` or `[group "id"]` opens a section (groups:
// inject-error, set-state); any other line is `key = "value"`, and a line whose first word is not
// followed by `= "value"` sets that word to "" (which then fails as an unknown parameter). Numbers
// accept C prefixes (0x, 0) and wrap negative values; booleans are on/off/yes/no/true/false/y/n.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "block/drivers/blkdebug/rules.h"

namespace strata::block::blkdebug {

// One section or list element, holding what QemuOpts would hold.
struct RuleSpec {
  Rule::Action action = Rule::Action::kInjectError;
  std::optional<std::string> id;
  std::optional<std::string> event;
  std::optional<uint64_t> state;
  std::optional<std::string> iotype;
  std::optional<uint64_t> errno_value;
  std::optional<uint64_t> sector;
  std::optional<bool> once;
  std::optional<bool> immediately;
  std::optional<uint64_t> new_state;
};

// Reads `path` ("Could not read blkdebug config file: <strerror>" when it cannot be opened).
Result<std::vector<RuleSpec>> read_config_file(const std::string& path);
// Parses config file text (the part of read_config_file after reading).
Result<std::vector<RuleSpec>> parse_config_text(const std::string& text);

// Checks ids across all specs ("Duplicate ID 'x' for inject-error") and turns them into rules in
// QEMU's registration order: every inject-error spec, then every set-state spec.
Result<std::vector<Rule>> make_rules(const std::vector<RuleSpec>& specs);

// QEMU's QDict iteration order for `keys` given in insertion order (tdb_hash buckets, newest
// first within a bucket): the order in which QEMU reports the first bad option.
std::vector<std::string> qdict_order(const std::vector<std::string>& keys);

}  // namespace strata::block::blkdebug
