#include <gtest/gtest.h>

#include "qmp/json_stream.h"

namespace strata::qmp {
namespace {

TEST(ParseKeyvalOrJson, PicksSyntaxByFirstCharacter) {
  Result<nlohmann::json> j = parse_keyval_or_json(R"({"driver":"null-co","size":1024})", "driver");
  ASSERT_TRUE(j.ok());
  EXPECT_EQ((*j)["size"], 1024);
  EXPECT_TRUE(option_is_json(R"({"driver":"null-co"})"));
  Result<nlohmann::json> k = parse_keyval_or_json("null-co,size=1024", "driver");
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->dump(), R"({"driver":"null-co","size":"1024"})");
  EXPECT_EQ(parse_keyval_or_json("{\"a\":", "driver").error().message(),
            "JSON parse error, premature EOI");
  EXPECT_EQ(parse_keyval_or_json("{} {}", "driver").error().message(),
            "Expecting at most one JSON value");
  EXPECT_EQ(parse_keyval_or_json("a..b=1", "driver").error().message(), "Invalid parameter 'a..b'");
}

}  // namespace
}  // namespace strata::qmp
