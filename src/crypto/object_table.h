#pragma once
// ObjectTable: the user-created crypto objects of a daemon, by id — tls-creds-x509,
// tls-creds-psk, authz-simple and authz-list — decoded from object-add / --object arguments with
// QEMU's property names, defaults and error texts.
//
// Lifetime: the table hands out shared pointers; deleting an object (object-del) removes it from
// the table while users that resolved it earlier (a running NBD server) keep their reference, as
// QEMU's reference counting does.
//
// Threading: main loop only.

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <variant>

#include "base/arg_decoder.h"
#include "base/result.h"
#include "crypto/authz.h"
#include "crypto/tls_creds.h"

namespace strata::crypto {

class ObjectTable {
 public:
  // The qom-types this table creates.
  static constexpr std::string_view kTypes[] = {"tls-creds-x509", "tls-creds-psk", "authz-simple",
                                                "authz-list"};
  static bool handles(std::string_view qom_type);

  // Decodes the remaining properties of `d` (qom-type and id already taken), finishes `d`, checks
  // `id` with `id_taken` (QEMU's "attempt to add duplicate property" error) and creates the
  // object (loading its files).
  Result<void> add(const std::string& qom_type, const std::string& id, ArgDecoder& d,
                   const std::function<bool(const std::string&)>& id_taken);
  bool contains(const std::string& id) const { return objects_.count(id) != 0; }
  // Adds credentials made elsewhere (an nbds:// URI's); false when `id` is taken.
  bool insert(const std::string& id, std::shared_ptr<const TlsCreds> creds) {
    return objects_.emplace(id, std::move(creds)).second;
  }
  // False when no such object.
  bool remove(const std::string& id);

  // nullptr when absent or of another kind.
  std::shared_ptr<const TlsCreds> tls_creds(const std::string& id) const;
  std::shared_ptr<const Authz> authz(const std::string& id) const;
  // QEMU's nbd_get_tls_creds: the credentials `id` names, which must be for `endpoint`, with
  // QEMU's errors ("No TLS credentials with id 'X'", "Object with id 'X' is not TLS
  // credentials", "Expected TLS credentials for a server endpoint"). `other_object` tells
  // whether an object outside this table (an iothread) has the id.
  Result<std::shared_ptr<const TlsCreds>> find_tls_creds(const std::string& id,
                                                         TlsEndpoint endpoint,
                                                         bool other_object) const;

 private:
  using Object = std::variant<std::shared_ptr<const TlsCreds>, std::shared_ptr<const Authz>>;
  std::map<std::string, Object, std::less<>> objects_;
};

}  // namespace strata::crypto
