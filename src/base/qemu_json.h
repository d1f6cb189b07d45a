#pragma once
// QEMU's JSON text for tool output: members in the order a QDict iterates them (hash bucket of
// the key, later-inserted first within a bucket) and qobject_to_json_pretty's layout, so that
// `strata img info --output=json` prints the same bytes as qemu-img. Also qemu-img's human dump
// of format-specific data (dump_qdict).

#include <string>

#include <nlohmann/json.hpp>

namespace strata {

// `value` as QEMU prints it: pretty (4-space indent, "key": value) or compact.
std::string qemu_json(const nlohmann::json& value, bool pretty);

// qemu-img's dump_qobject of a format-specific "data" object at `indentation` (units of 4
// spaces); keys have '-' replaced by ' '.
std::string qemu_dump_object(const nlohmann::json& value, int indentation);

}  // namespace strata
