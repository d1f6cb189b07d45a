#include "crypto/authz.h"

#include <fnmatch.h>

namespace strata::crypto {

bool AuthzList::is_allowed(std::string_view identity) const {
  std::string subject(identity);
  for (const AuthzRule& rule : rules_) {
    bool matched = rule.format == AuthzFormat::kGlob
                       ? ::fnmatch(rule.match.c_str(), subject.c_str(), 0) == 0
                       : rule.match == subject;
    if (matched) {
      return rule.policy == AuthzPolicy::kAllow;
    }
  }
  return policy_ == AuthzPolicy::kAllow;
}

}  // namespace strata::crypto
