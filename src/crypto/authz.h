#pragma once
// Authorization objects: QEMU's `authz-simple` (one allowed identity) and `authz-list` (ordered
// rules, first match wins, else the default policy) — authz/simple.c, authz/list.c. The NBD server
// asks them whether a TLS client's x509 distinguished name may connect.
//
// Thread-safety: immutable after creation.

#include <string>
#include <string_view>
#include <vector>

namespace strata::crypto {

class Authz {
 public:
  virtual ~Authz() = default;
  virtual bool is_allowed(std::string_view identity) const = 0;
};

class AuthzSimple final : public Authz {
 public:
  explicit AuthzSimple(std::string identity) : identity_(std::move(identity)) {}
  bool is_allowed(std::string_view identity) const override { return identity == identity_; }

 private:
  std::string identity_;
};

enum class AuthzPolicy { kDeny, kAllow };
enum class AuthzFormat { kExact, kGlob };

struct AuthzRule {
  std::string match;
  AuthzPolicy policy = AuthzPolicy::kDeny;
  AuthzFormat format = AuthzFormat::kExact;
};

class AuthzList final : public Authz {
 public:
  AuthzList(AuthzPolicy policy, std::vector<AuthzRule> rules)
      : policy_(policy), rules_(std::move(rules)) {}
  // The policy of the first rule whose match (exact, or fnmatch glob) equals `identity`;
  // the list's policy when none does.
  bool is_allowed(std::string_view identity) const override;

 private:
  AuthzPolicy policy_;
  std::vector<AuthzRule> rules_;
};

}  // namespace strata::crypto
