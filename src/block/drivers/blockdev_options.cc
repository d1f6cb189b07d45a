#include "block/drivers/blockdev_options.h"

#include <array>

#include "block/drivers/driver.h"

namespace strata::block {

namespace {
constexpr std::array<std::string_view, 2> kDiscardValues = {"ignore", "unmap"};
constexpr std::array<std::string_view, 3> kDetectZeroesValues = {"off", "on", "unmap"};
}  // namespace

CommonOptions BlockdevOptions::resolve(const CommonOptions* parent) const {
  CommonOptions c;
  c.node_name = node_name.value_or("");
  c.read_only = read_only.value_or(parent != nullptr ? parent->read_only : false);
  c.auto_read_only = auto_read_only.value_or(parent != nullptr ? parent->auto_read_only : false);
  c.force_share = force_share.value_or(parent != nullptr ? parent->force_share : false);
  c.active = active.value_or(true);
  c.discard = discard.value_or(parent != nullptr ? parent->discard : "ignore");
  c.detect_zeroes = detect_zeroes.value_or("off");
  c.cache_direct = cache_direct.value_or(parent != nullptr ? parent->cache_direct : false);
  c.cache_no_flush = cache_no_flush.value_or(parent != nullptr ? parent->cache_no_flush : false);
  return c;
}

std::shared_ptr<BlockdevOptions> parse_blockdev_options(ArgDecoder& d,
                                                        const nlohmann::json& object) {
  auto options = std::make_shared<BlockdevOptions>();
  options->json = object;
  // Members in QAPI order: the common base first, then the driver's branch.
  std::vector<std::string_view> names;
  for (const auto& driver : all_drivers()) {
    names.push_back(driver.name);
  }
  options->driver = d.enumeration("driver", names);
  options->node_name = d.opt_str("node-name");
  options->discard = d.opt_enum("discard", kDiscardValues);
  if (auto cache = d.opt_object("cache")) {
    options->cache_direct = cache->opt_bool("direct");
    options->cache_no_flush = cache->opt_bool("no-flush");
    ignore_error(cache->finish(), "recorded in the shared decoder state");
  }
  options->read_only = d.opt_bool("read-only");
  options->auto_read_only = d.opt_bool("auto-read-only");
  options->force_share = d.opt_bool("force-share");
  options->detect_zeroes = d.opt_enum("detect-zeroes", kDetectZeroesValues);
  options->active = d.opt_bool("active");
  if (d.failed()) {
    return options;
  }
  const Driver* driver = find_driver(options->driver);
  if (driver != nullptr) {
    options->driver_options = driver->parse(d);
  }
  return options;
}

std::optional<BlockdevRef> parse_blockdev_ref(ArgDecoder& d, std::string_view name, bool required,
                                              bool allow_null) {
  if (!d.has(name)) {
    if (required) {
      d.fail(make_error(ErrorKind::kInvalidArgument,
                        "Parameter '" + d.full_name(name) + "' is missing"));
    }
    return std::nullopt;
  }
  const nlohmann::json* member = d.opt_any(name);
  if (member == nullptr) {
    return std::nullopt;
  }
  BlockdevRef ref;
  if (member->is_string()) {
    ref.node_name = member->get<std::string>();
    return ref;
  }
  if (member->is_null() && allow_null) {
    ref.is_null = true;
    return ref;
  }
  if (!member->is_object()) {
    d.fail(make_error(
        ErrorKind::kInvalidArgument,
        "Invalid parameter type for '" + d.full_name(name) + "', expected: BlockdevRef"));
    return std::nullopt;
  }
  ArgDecoder child = d.nested(*member, name);
  ref.inline_options = parse_blockdev_options(child, *member);
  ignore_error(child.finish(), "recorded in the shared decoder state");
  return ref;
}

}  // namespace strata::block
