// nbd-server-start's tls-creds and tls-authz (QEMU blockdev-nbd.c nbd_get_tls_creds; authz
// resolved per client as qauthz_is_allowed_by_id does, a missing object denying).

#include "daemon/daemon.h"
#include "daemon/exports.h"
#include "nbd/server_connection.h"

namespace strata::daemon {

Result<std::shared_ptr<const nbd::ServerTls>> ExportManager::server_tls(
    const std::string& creds_id, const std::optional<std::string>& authz_id) const {
  const crypto::ObjectTable& objects = daemon_.crypto_objects();
  auto creds = objects.find_tls_creds(creds_id, crypto::TlsEndpoint::kServer,
                                      daemon_.has_iothread(creds_id));
  if (!creds) {
    return std::move(creds).error();
  }
  auto tls = std::make_shared<nbd::ServerTls>();
  tls->creds = std::move(creds).value();
  if (authz_id) {
    tls->authorize = [&objects, id = *authz_id](const std::string& name) -> Result<void> {
      auto authz = objects.authz(id);
      if (!authz) {
        return make_error(ErrorKind::kNotFound, "Cannot find QAuthZ object ID " + id);
      }
      if (!authz->is_allowed(name)) {
        return make_error(ErrorKind::kPermission,
                          "TLS x509 authz check for " + name + " is denied");
      }
      return ok();
    };
  }
  return std::shared_ptr<const nbd::ServerTls>(std::move(tls));
}

}  // namespace strata::daemon
