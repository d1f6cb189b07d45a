// object-add for the crypto object types (tls-creds-x509, tls-creds-psk, authz-simple,
// authz-list); the objects themselves live in crypto/object_table.h.

#include "base/arg_decoder.h"
#include "daemon/daemon.h"

namespace strata::daemon {

Result<void> Daemon::add_crypto_object(const std::string& qom_type, const std::string& id,
                                       ArgDecoder& d) {
  // QEMU sets the properties, then adds the object under its id, then loads it: property errors
  // come first, the duplicate id second, file errors last.
  return crypto_objects_.add(qom_type, id, d,
                             [this](const std::string& name) { return object_id_taken(name); });
}

}  // namespace strata::daemon
