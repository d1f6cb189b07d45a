#include "crypto/object_table.h"

#include <algorithm>
#include <array>

namespace strata::crypto {

namespace {

constexpr std::array<std::string_view, 2> kEndpoints = {"client", "server"};
constexpr std::array<std::string_view, 2> kPolicies = {"deny", "allow"};
constexpr std::array<std::string_view, 2> kFormats = {"exact", "glob"};

TlsEndpoint endpoint_of(const std::optional<std::string>& name) {
  return name.value_or("client") == "server" ? TlsEndpoint::kServer : TlsEndpoint::kClient;
}

AuthzPolicy policy_of(const std::string& name) {
  return name == "allow" ? AuthzPolicy::kAllow : AuthzPolicy::kDeny;
}

Error missing_dir() {
  return make_error(ErrorKind::kInvalidArgument, "Missing 'dir' property value");
}

}  // namespace

bool ObjectTable::handles(std::string_view qom_type) {
  return std::find(std::begin(kTypes), std::end(kTypes), qom_type) != std::end(kTypes);
}

Result<void> ObjectTable::add(const std::string& qom_type, const std::string& id, ArgDecoder& d,
                              const std::function<bool(const std::string&)>& id_taken) {
  // Every type checks in QEMU's order: its properties, then the id, then the type's own checks
  // and loading (`make`, returning Result<Object>).
  auto add_object = [&](auto make) -> Result<void> {
    auto decoded = d.finish();
    if (!decoded) {
      return decoded;
    }
    if (id_taken(id)) {
      return make_error(ErrorKind::kExists, "attempt to add duplicate property '" + id +
                                                "' to object (type 'container')");
    }
    Result<Object> object = make();
    if (!object) {
      return std::move(object).error();
    }
    objects_.emplace(id, std::move(object).value());
    return ok();
  };
  if (qom_type == "tls-creds-x509") {
    TlsCredsX509Options options;
    options.endpoint = endpoint_of(d.opt_enum("endpoint", kEndpoints));
    std::optional<std::string> dir = d.opt_str("dir");
    options.verify_peer = d.opt_bool("verify-peer").value_or(true);
    options.priority = d.opt_str("priority");
    (void)d.opt_bool("loaded");
    options.sanity_check = d.opt_bool("sanity-check").value_or(true);
    (void)d.opt_str("passwordid");
    return add_object([&]() -> Result<Object> {
      if (!dir) {
        return missing_dir();
      }
      options.dir = *dir;
      auto creds = load_x509_creds(options);
      if (!creds) {
        return std::move(creds).error();
      }
      return Object(std::move(creds).value());
    });
  }
  if (qom_type == "tls-creds-psk") {
    TlsCredsPskOptions options;
    options.endpoint = endpoint_of(d.opt_enum("endpoint", kEndpoints));
    std::optional<std::string> dir = d.opt_str("dir");
    (void)d.opt_bool("verify-peer");
    options.priority = d.opt_str("priority");
    (void)d.opt_bool("loaded");
    options.username = d.opt_str("username");
    return add_object([&]() -> Result<Object> {
      if (!dir) {
        return missing_dir();
      }
      options.dir = *dir;
      auto creds = load_psk_creds(options);
      if (!creds) {
        return std::move(creds).error();
      }
      return Object(std::move(creds).value());
    });
  }
  if (qom_type == "authz-simple") {
    std::string identity = d.str("identity");
    return add_object([&]() -> Result<Object> {
      return Object(std::shared_ptr<const Authz>(std::make_shared<AuthzSimple>(identity)));
    });
  }
  // authz-list
  AuthzPolicy policy = policy_of(d.opt_enum("policy", kPolicies).value_or("deny"));
  std::vector<AuthzRule> rules;
  auto elements = d.opt_list("rules");
  if (elements) {
    for (size_t i = 0; i < elements->size(); ++i) {
      ArgDecoder e = d.element_decoder((*elements)[i], i, "rules");
      AuthzRule rule;
      rule.match = e.str("match");
      rule.policy = policy_of(e.enumeration("policy", kPolicies));
      rule.format = e.opt_enum("format", kFormats).value_or("exact") == "glob"
                        ? AuthzFormat::kGlob
                        : AuthzFormat::kExact;
      ignore_error(e.finish(), "recorded in the shared decoder state");
      rules.push_back(std::move(rule));
    }
  }
  return add_object([&]() -> Result<Object> {
    return Object(
        std::shared_ptr<const Authz>(std::make_shared<AuthzList>(policy, std::move(rules))));
  });
}

bool ObjectTable::remove(const std::string& id) {
  return objects_.erase(id) != 0;
}

std::shared_ptr<const TlsCreds> ObjectTable::tls_creds(const std::string& id) const {
  auto it = objects_.find(id);
  if (it == objects_.end()) {
    return nullptr;
  }
  auto* creds = std::get_if<std::shared_ptr<const TlsCreds>>(&it->second);
  return creds != nullptr ? *creds : nullptr;
}

Result<std::shared_ptr<const TlsCreds>> ObjectTable::find_tls_creds(const std::string& id,
                                                                    TlsEndpoint endpoint,
                                                                    bool other_object) const {
  auto creds = tls_creds(id);
  if (creds == nullptr) {
    if (!contains(id) && !other_object) {
      return make_error(ErrorKind::kNotFound, "No TLS credentials with id '" + id + "'");
    }
    return make_error(ErrorKind::kInvalidArgument,
                      "Object with id '" + id + "' is not TLS credentials");
  }
  if (creds->endpoint() != endpoint) {
    return make_error(ErrorKind::kInvalidArgument,
                      std::string("Expected TLS credentials for a ") +
                          (endpoint == TlsEndpoint::kServer ? "server" : "client") + " endpoint");
  }
  return creds;
}

std::shared_ptr<const Authz> ObjectTable::authz(const std::string& id) const {
  auto it = objects_.find(id);
  if (it == objects_.end()) {
    return nullptr;
  }
  auto* authz = std::get_if<std::shared_ptr<const Authz>>(&it->second);
  return authz != nullptr ? *authz : nullptr;
}

}  // namespace strata::crypto
