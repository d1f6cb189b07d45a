// authz-simple / authz-list decisions and ObjectTable's decoding of crypto objects (QEMU's
// property names, defaults and error texts).

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "base/arg_decoder.h"
#include "crypto/authz.h"
#include "crypto/object_table.h"

namespace strata::crypto {
namespace {

TEST(Authz, SimpleMatchesExactlyOneIdentity) {
  AuthzSimple authz("C=GB,O=Test,CN=client");
  EXPECT_TRUE(authz.is_allowed("C=GB,O=Test,CN=client"));
  EXPECT_FALSE(authz.is_allowed("C=GB,O=Test,CN=client2"));
  EXPECT_FALSE(authz.is_allowed(""));
}

TEST(Authz, ListFirstMatchingRuleWinsElsePolicy) {
  AuthzList list(AuthzPolicy::kDeny,
                 {{"C=GB,O=Test,CN=mallory", AuthzPolicy::kDeny, AuthzFormat::kExact},
                  {"C=GB,O=Test,CN=*", AuthzPolicy::kAllow, AuthzFormat::kGlob}});
  EXPECT_TRUE(list.is_allowed("C=GB,O=Test,CN=client"));
  EXPECT_FALSE(list.is_allowed("C=GB,O=Test,CN=mallory"));
  EXPECT_FALSE(list.is_allowed("C=FR,O=Test,CN=client"));
  AuthzList open(AuthzPolicy::kAllow, {{"CN=*", AuthzPolicy::kDeny, AuthzFormat::kExact}});
  EXPECT_TRUE(open.is_allowed("CN=x"));  // exact rules take '*' literally
  EXPECT_FALSE(open.is_allowed("CN=*"));
}

Result<void> add(ObjectTable& table, const nlohmann::json& args) {
  ArgDecoder d(args);
  std::string type = args.at("qom-type");
  std::string id = args.at("id");
  (void)d.str("qom-type");
  (void)d.str("id");
  return table.add(type, id, d, [&](const std::string& name) { return table.contains(name); });
}

TEST(ObjectTable, DecodesAuthzListAndResolvesKinds) {
  ObjectTable table;
  auto added =
      add(table, {{"qom-type", "authz-list"},
                  {"id", "a0"},
                  {"policy", "deny"},
                  {"rules", {{{"match", "CN=*"}, {"policy", "allow"}, {"format", "glob"}}}}});
  ASSERT_TRUE(added.ok()) << added.error().message();
  ASSERT_NE(table.authz("a0"), nullptr);
  EXPECT_TRUE(table.authz("a0")->is_allowed("CN=x"));
  EXPECT_EQ(table.tls_creds("a0"), nullptr);
  EXPECT_EQ(table.authz("nosuch"), nullptr);

  auto duplicate = add(table, {{"qom-type", "authz-simple"}, {"id", "a0"}, {"identity", "x"}});
  ASSERT_FALSE(duplicate.ok());
  EXPECT_EQ(duplicate.error().message(),
            "attempt to add duplicate property 'a0' to object (type 'container')");
  EXPECT_TRUE(table.remove("a0"));
  EXPECT_FALSE(table.remove("a0"));
}

TEST(ObjectTable, ErrorsUseQemuTexts) {
  ObjectTable table;
  auto bad_format =
      add(table, {{"qom-type", "authz-list"},
                  {"id", "a1"},
                  {"rules", {{{"match", "x"}, {"policy", "allow"}, {"format", "re"}}}}});
  ASSERT_FALSE(bad_format.ok());
  EXPECT_EQ(bad_format.error().message(), "Parameter 'format' does not accept value 're'");
  auto no_dir = add(table, {{"qom-type", "tls-creds-x509"}, {"id", "t0"}, {"endpoint", "server"}});
  ASSERT_FALSE(no_dir.ok());
  EXPECT_EQ(no_dir.error().message(), "Missing 'dir' property value");
  auto bad_endpoint =
      add(table, {{"qom-type", "tls-creds-psk"}, {"id", "t0"}, {"dir", "/"}, {"endpoint", "both"}});
  ASSERT_FALSE(bad_endpoint.ok());
  EXPECT_EQ(bad_endpoint.error().message(), "Parameter 'endpoint' does not accept value 'both'");
  auto no_identity = add(table, {{"qom-type", "authz-simple"}, {"id", "a2"}});
  ASSERT_FALSE(no_identity.ok());
  EXPECT_EQ(no_identity.error().message(), "Parameter 'identity' is missing");
  EXPECT_FALSE(table.contains("t0"));
  EXPECT_FALSE(table.contains("a2"));
}

}  // namespace
}  // namespace strata::crypto
