#include "base/keyval.h"

#include <string>

#include <gtest/gtest.h>

namespace strata {
namespace {

std::string parsed(std::string_view text, std::string_view implied = {}) {
  Result<nlohmann::json> result = parse_keyval(text, implied);
  return result.ok() ? result->dump() : "ERR: " + result.error().message();
}

TEST(Keyval, FlatPairsAreStrings) {
  EXPECT_EQ(parsed("driver=null-co,node-name=n0,size=1024"),
            R"({"driver":"null-co","node-name":"n0","size":"1024"})");
  EXPECT_EQ(parsed(""), "{}");
  EXPECT_EQ(parsed("a=1,"), R"({"a":"1"})");
  EXPECT_EQ(parsed("a="), R"({"a":""})");
}

TEST(Keyval, DoubleCommaEscapes) {
  EXPECT_EQ(parsed("filename=a,,b,,,c=d"), R"({"c":"d","filename":"a,b,"})");
  EXPECT_EQ(parsed("a=x,,"), R"({"a":"x,"})");
  EXPECT_EQ(parsed("a=b=c"), R"({"a":"b=c"})");
}

TEST(Keyval, DottedKeysNest) {
  EXPECT_EQ(
      parsed("driver=qcow2,file.driver=file,file.filename=/tmp/x,file.cache.direct=on"),
      R"({"driver":"qcow2","file":{"cache":{"direct":"on"},"driver":"file","filename":"/tmp/x"}})");
}

TEST(Keyval, NumericFragmentsBuildLists) {
  EXPECT_EQ(parsed("a.0=x,a.1=y"), R"({"a":["x","y"]})");
  EXPECT_EQ(parsed("a.1=y,a.0=x"), R"({"a":["x","y"]})");
  EXPECT_EQ(parsed("l.0.event=read_aio,l.0.errno=5,l.1.event=flush_to_disk"),
            R"({"l":[{"errno":"5","event":"read_aio"},{"event":"flush_to_disk"}]})");
  EXPECT_EQ(parsed("a.0.0=x"), R"({"a":[["x"]]})");
}

TEST(Keyval, ListErrors) {
  EXPECT_EQ(parsed("a.1=y"), "ERR: Parameter 'a.0' missing");
  EXPECT_EQ(parsed("a.0=x,a.2=z"), "ERR: Parameter 'a.1' missing");
  EXPECT_EQ(parsed("a.0=x,a.b=y"), "ERR: Parameters 'a.*' used inconsistently");
  EXPECT_EQ(parsed("0=x"), "ERR: Invalid parameter '0'");
}

TEST(Keyval, LastValueWins) {
  EXPECT_EQ(parsed("a=1,a=2"), R"({"a":"2"})");
}

TEST(Keyval, InconsistentUse) {
  EXPECT_EQ(parsed("a.b=1,a=2"), "ERR: Parameters 'a.*' used inconsistently");
  EXPECT_EQ(parsed("a=2,a.b=1"), "ERR: Parameters 'a.*' used inconsistently");
  EXPECT_EQ(parsed("a.b.c=1,a.b=2"), "ERR: Parameters 'a.b.*' used inconsistently");
}

TEST(Keyval, InvalidKeys) {
  EXPECT_EQ(parsed("foo..bar=1"), "ERR: Invalid parameter 'foo..bar'");
  EXPECT_EQ(parsed(".a=1"), "ERR: Invalid parameter '.a'");
  EXPECT_EQ(parsed("a.=1"), "ERR: Invalid parameter 'a.'");
  EXPECT_EQ(parsed("1a=1"), "ERR: Invalid parameter '1a'");
  EXPECT_EQ(parsed("a.0b=1"), "ERR: Invalid parameter 'a.0b'");
  EXPECT_EQ(parsed("a b=1"), "ERR: Invalid parameter 'a b'");
  EXPECT_EQ(parsed(",a=1"), "ERR: Invalid parameter ''");
  EXPECT_EQ(parsed("=1"), "ERR: Invalid parameter ''");
  EXPECT_EQ(parsed("__org.example_x=1"), R"({"__org.example_x":"1"})");
}

TEST(Keyval, ExpectedEquals) {
  EXPECT_EQ(parsed("x"), "ERR: Expected '=' after parameter 'x'");
  EXPECT_EQ(parsed("a=1,b"), "ERR: Expected '=' after parameter 'b'");
  EXPECT_EQ(parsed("a.b,c=1"), "ERR: Expected '=' after parameter 'a.b'");
}

TEST(Keyval, TooLong) {
  std::string key(128, 'k');
  EXPECT_EQ(parsed(key + "=1"), "ERR: Parameter '" + key + "' is too long");
  EXPECT_EQ(parsed("a." + key + "=1"), "ERR: Parameter fragment '" + key + "' is too long");
  EXPECT_EQ(parsed(std::string(127, 'k') + "=1").substr(0, 3), "{\"k");
}

TEST(Keyval, ImpliedKey) {
  EXPECT_EQ(parsed("c", "chardev"), R"({"chardev":"c"})");
  EXPECT_EQ(parsed("c,pretty=on", "chardev"), R"({"chardev":"c","pretty":"on"})");
  EXPECT_EQ(parsed("nbd,id=e0,node-name=n0", "type"),
            R"({"id":"e0","node-name":"n0","type":"nbd"})");
  EXPECT_EQ(parsed("socket,path=/tmp/s,id=c", "backend"),
            R"({"backend":"socket","id":"c","path":"/tmp/s"})");
  // Only the first element may omit its key, and an explicit key still works.
  EXPECT_EQ(parsed("chardev=c", "chardev"), R"({"chardev":"c"})");
  EXPECT_EQ(parsed("id=x,nbd", "type"), "ERR: Expected '=' after parameter 'nbd'");
  EXPECT_EQ(parsed("c,d", "chardev"), "ERR: Expected '=' after parameter 'd'");
}

TEST(Keyval, Help) {
  EXPECT_EQ(parsed("help"), "ERR: Help is not available for this option");
  EXPECT_EQ(parsed("driver=file,?"), "ERR: Help is not available for this option");
  Result<KeyvalParse> with_help = parse_keyval_with_help("qom-type=iothread,help");
  ASSERT_TRUE(with_help.ok());
  EXPECT_TRUE(with_help->help);
  EXPECT_EQ(with_help->object.dump(), R"({"qom-type":"iothread"})");
  Result<KeyvalParse> no_help = parse_keyval_with_help("helpful=1");
  ASSERT_TRUE(no_help.ok());
  EXPECT_FALSE(no_help->help);
}

TEST(Keyval, StopsAtNul) {
  EXPECT_EQ(parsed(std::string_view("a=1\0b", 5)), R"({"a":"1"})");
}

}  // namespace
}  // namespace strata
