#include "daemon/qom_commands.h"

#include "base/arg_decoder.h"
#include "daemon/daemon.h"

namespace strata::daemon {

namespace {

constexpr const char kObjectsPrefix[] = "/objects/";

// The object id a QOM path names, or "" when the path is not /objects/ID or a bare id.
std::string object_id(const std::string& path) {
  if (path.rfind(kObjectsPrefix, 0) == 0) {
    return path.substr(sizeof(kObjectsPrefix) - 1);
  }
  return path.find('/') == std::string::npos ? path : std::string();
}

Error device_not_found(const std::string& path) {
  return make_error(ErrorKind::kNotFound, "Device '" + path + "' not found")
      .with_qmp_class("DeviceNotFound");
}

Error property_not_found(const std::string& type, const std::string& property) {
  return make_error(ErrorKind::kNotFound, "Property '" + type + "." + property + "' not found");
}

// The object at `path`: a throttle group, or an error for a path that names nothing (QEMU's
// DeviceNotFound) or an object whose properties strata does not expose.
Result<std::shared_ptr<block::throttle::ThrottleGroup>> resolve(Daemon& daemon,
                                                                const std::string& path) {
  const std::string id = object_id(path);
  auto group = daemon.throttle_groups().find(id);
  if (group != nullptr) {
    return group;
  }
  if (!id.empty() && daemon.object_id_taken(id)) {
    return make_error(ErrorKind::kUnsupported,
                      "qom-get and qom-set reach throttle-group objects only in strata");
  }
  return device_not_found(path);
}

// What qom-get/qom-set name: the group and the property. With `value` (qom-set), also takes the
// `value` member. Finishes `d`.
struct QomTarget {
  std::shared_ptr<block::throttle::ThrottleGroup> group;
  std::string property;
  const nlohmann::json* value = nullptr;
};
Result<QomTarget> decode_target(Daemon& daemon, ArgDecoder& d, bool with_value) {
  QomTarget target;
  std::string path = d.str("path");
  target.property = d.str("property");
  if (with_value) {
    target.value = d.opt_any("value");
    if (target.value == nullptr && !d.failed()) {
      d.fail(make_error(ErrorKind::kInvalidArgument, "Parameter 'value' is missing"));
    }
  }
  auto decoded = d.finish();
  if (!decoded) {
    return std::move(decoded).error();
  }
  auto group = resolve(daemon, path);
  if (!group) {
    return std::move(group).error();
  }
  target.group = std::move(group).value();
  return target;
}

bool is_legacy_member(const std::string& property) {
  const nlohmann::json legacy = block::throttle::limits_json({}, "x-");
  return legacy.contains(property);
}

}  // namespace

void register_qom_commands(Daemon& daemon) {
  daemon.command_table().add(
      "qom-get",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        auto target = decode_target(daemon, d, false);
        if (!target) {
          co_return std::move(target).error();
        }
        if (target->property == "limits") {
          co_return block::throttle::limits_json(target->group->limits(), "");
        }
        if (is_legacy_member(target->property)) {
          co_return block::throttle::limits_json(target->group->limits(), "x-")[target->property];
        }
        co_return property_not_found("throttle-group", target->property);
      });
  daemon.command_table().add(
      "qom-set",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        ArgDecoder d(args);
        auto target = decode_target(daemon, d, true);
        if (!target) {
          co_return std::move(target).error();
        }
        if (target->property == "limits") {
          if (!target->value->is_object()) {
            co_return make_error(ErrorKind::kInvalidArgument,
                                 "Invalid parameter type for 'limits', expected: object");
          }
          ArgDecoder limits(*target->value, "limits");
          auto set = target->group->set_limits(limits);
          if (!set) {
            co_return std::move(set).error();
          }
          co_return nlohmann::json::object();
        }
        if (is_legacy_member(target->property)) {
          co_return make_error(ErrorKind::kInvalidArgument,
                               "Property cannot be set after initialization");
        }
        co_return property_not_found("throttle-group", target->property);
      });
}

}  // namespace strata::daemon
