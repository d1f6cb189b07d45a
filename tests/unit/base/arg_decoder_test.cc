#include "base/arg_decoder.h"

#include <array>
#include <string>

#include <gtest/gtest.h>

#include "base/keyval.h"

namespace strata {
namespace {

nlohmann::json json(std::string_view text) {
  nlohmann::json parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(parsed.is_discarded()) << text;
  return parsed.is_discarded() ? nlohmann::json::object() : parsed;
}

std::string error_of(ArgDecoder& d) {
  Result<void> r = d.finish();
  return r.ok() ? "ok" : r.error().message();
}

constexpr std::array<std::string_view, 2> kDiscard = {"ignore", "unmap"};

TEST(ArgDecoder, ReadsTypedMembers) {
  nlohmann::json args =
      json(R"({"s": "x", "i": -5, "u": 7, "b": true, "n": 1.5, "e": "unmap", "sz": 4096})");
  ArgDecoder d(args);
  EXPECT_EQ(d.str("s"), "x");
  EXPECT_EQ(d.i64("i"), -5);
  EXPECT_EQ(d.u64("u"), 7u);
  EXPECT_TRUE(d.boolean("b"));
  EXPECT_EQ(d.opt_number("n"), 1.5);
  EXPECT_EQ(d.enumeration("e", kDiscard), "unmap");
  EXPECT_EQ(d.opt_size("sz"), 4096u);
  EXPECT_EQ(d.opt_str("absent"), std::nullopt);
  EXPECT_EQ(error_of(d), "ok");
}

TEST(ArgDecoder, Missing) {
  nlohmann::json args = json(R"({"node-name": "n0"})");
  ArgDecoder d(args);
  d.str("driver");
  EXPECT_EQ(error_of(d), "Parameter 'driver' is missing");
}

TEST(ArgDecoder, Unexpected) {
  nlohmann::json args = json(R"({"driver": "null-co", "bogus": 1})");
  ArgDecoder d(args);
  d.str("driver");
  EXPECT_EQ(error_of(d), "Parameter 'bogus' is unexpected");
}

TEST(ArgDecoder, FirstErrorWins) {
  nlohmann::json args = json(R"({"a": 1, "zzz": 2})");
  ArgDecoder d(args);
  d.str("a");        // type error first
  d.str("missing");  // no-op now
  EXPECT_TRUE(d.failed());
  EXPECT_EQ(error_of(d), "Invalid parameter type for 'a', expected: string");
}

TEST(ArgDecoder, TypeErrors) {
  nlohmann::json args =
      json(R"({"s": 1, "i": "1", "f": 1.5, "b": "on", "o": [], "l": {}, "n": "x", "nul": null})");
  auto check = [&](auto visit, const std::string& message) {
    ArgDecoder d(args);
    visit(d);
    Result<void> r = d.finish();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().message(), message);
  };
  check([](ArgDecoder& d) { d.str("s"); }, "Invalid parameter type for 's', expected: string");
  check([](ArgDecoder& d) { d.i64("i"); }, "Invalid parameter type for 'i', expected: integer");
  check([](ArgDecoder& d) { d.i64("f"); }, "Invalid parameter type for 'f', expected: integer");
  check([](ArgDecoder& d) { d.boolean("b"); }, "Invalid parameter type for 'b', expected: boolean");
  check([](ArgDecoder& d) { d.object("o"); }, "Invalid parameter type for 'o', expected: object");
  check([](ArgDecoder& d) { (void)d.opt_list("l"); },
        "Invalid parameter type for 'l', expected: array");
  check([](ArgDecoder& d) { d.number("n"); }, "Invalid parameter type for 'n', expected: number");
  check([](ArgDecoder& d) { d.opt_str("nul"); },
        "Invalid parameter type for 'nul', expected: string");
  check([](ArgDecoder& d) { d.u64("i"); }, "Parameter 'i' expects uint64");
  check([](ArgDecoder& d) { d.u64("f"); }, "Parameter 'f' expects uint64");
  check([](ArgDecoder& d) { d.size("b"); }, "Parameter 'b' expects uint64");
}

TEST(ArgDecoder, Uint64AcceptsNegativeAndBigIntegers) {
  nlohmann::json args =
      json(R"({"neg": -1, "big": 18446744073709551615, "i": 9223372036854775808})");
  ArgDecoder d(args);
  EXPECT_EQ(d.u64("neg"), UINT64_MAX);
  EXPECT_EQ(d.u64("big"), UINT64_MAX);
  d.i64("i");
  EXPECT_EQ(error_of(d), "Invalid parameter type for 'i', expected: integer");
}

TEST(ArgDecoder, EnumUsesBareName) {
  nlohmann::json args = json(R"({"file": {"discard": "bogus"}})");
  ArgDecoder d(args);
  ArgDecoder file = d.object("file");
  file.opt_enum("discard", kDiscard);
  EXPECT_EQ(error_of(d), "Parameter 'discard' does not accept value 'bogus'");
}

TEST(ArgDecoder, EnumListElementsAreNull) {
  nlohmann::json args = json(R"({"enable": ["bogus"]})");
  constexpr std::array<std::string_view, 1> kCaps = {"oob"};
  ArgDecoder d(args);
  d.opt_enum_list("enable", kCaps);
  EXPECT_EQ(error_of(d), "Parameter 'null' does not accept value 'bogus'");

  nlohmann::json wrong = json(R"({"enable": [1]})");
  ArgDecoder d2(wrong);
  d2.opt_enum_list("enable", kCaps);
  EXPECT_EQ(error_of(d2), "Invalid parameter type for 'enable[0]', expected: string");
}

TEST(ArgDecoder, NestedPaths) {
  nlohmann::json args = json(R"({"options": [{"driver": "qcow2", "node-name": "n"}]})");
  ArgDecoder d(args);
  std::vector<nlohmann::json> options = d.list("options");
  ASSERT_EQ(options.size(), 1u);
  ArgDecoder element = d.element_decoder(options[0], 0, "options");
  element.str("driver");
  element.str("node-name");
  element.object("file");
  EXPECT_EQ(error_of(d), "Parameter 'options[0].file' is missing");
}

TEST(ArgDecoder, DeepNestedUint64Path) {
  nlohmann::json args = json(R"({"channels": [{"addr": {"offset": "x"}}]})");
  ArgDecoder d(args);
  auto channels = d.opt_list("channels");
  ArgDecoder channel = d.element_decoder((*channels)[0], 0, "channels");
  ArgDecoder addr = channel.object("addr");
  addr.u64("offset");
  EXPECT_EQ(error_of(d), "Parameter 'channels[0].addr.offset' expects uint64");
}

TEST(ArgDecoder, NestedUnexpectedIsReportedWhenChildFinishes) {
  nlohmann::json args = json(R"({"file": {"driver": "file", "extra": 1}, "later": 2})");
  ArgDecoder d(args);
  ArgDecoder file = d.object("file");
  file.str("driver");
  EXPECT_EQ(file.finish().error().message(), "Parameter 'file.extra' is unexpected");
  d.str("later");  // ignored: an error is recorded
  EXPECT_EQ(error_of(d), "Parameter 'file.extra' is unexpected");
}

TEST(ArgDecoder, ElementNotAnObject) {
  nlohmann::json args = json(R"({"options": [1]})");
  ArgDecoder d(args);
  auto options = d.opt_list("options");
  d.element_decoder((*options)[0], 0, "options");
  EXPECT_EQ(error_of(d), "Invalid parameter type for 'options[0]', expected: object");
}

TEST(ArgDecoder, AlternateViaOptAnyAndNested) {
  nlohmann::json args = json(R"({"file": {"driver": "file"}, "backing": null})");
  ArgDecoder d(args);
  const nlohmann::json* backing = d.opt_any("backing");
  ASSERT_NE(backing, nullptr);
  EXPECT_TRUE(backing->is_null());
  const nlohmann::json* file = d.opt_any("file");
  ASSERT_NE(file, nullptr);
  ArgDecoder child = d.nested(*file, "file");
  child.str("driver");
  child.str("filename");
  EXPECT_EQ(error_of(d), "Parameter 'file.filename' is missing");
}

TEST(ArgDecoder, SemanticFailRecordedInOrder) {
  nlohmann::json args = json(R"({"a": 1, "b": "x"})");
  ArgDecoder d(args);
  d.i64("a");
  d.fail(Error(ErrorKind::kInvalidArgument, "custom"));
  d.i64("b");
  EXPECT_EQ(error_of(d), "custom");
}

TEST(ArgDecoder, HasDoesNotConsume) {
  nlohmann::json args = json(R"({"a": 1})");
  ArgDecoder d(args);
  EXPECT_TRUE(d.has("a"));
  EXPECT_FALSE(d.has("b"));
  EXPECT_EQ(error_of(d), "Parameter 'a' is unexpected");
}

// ---- keyval typing ----

nlohmann::json keyval(std::string_view text) {
  Result<nlohmann::json> parsed = parse_keyval(text);
  EXPECT_TRUE(parsed.ok()) << text;
  return parsed.ok() ? std::move(parsed).value() : nlohmann::json::object();
}

TEST(ArgDecoderKeyval, ConvertsStrings) {
  nlohmann::json args = keyval("b1=on,b2=off,b3=yes,b4=n,i=-0x10,u=010,sz=1.5k,big=2G,n=2.5,s=txt");
  ArgDecoder d(args, "", true);
  EXPECT_TRUE(d.boolean("b1"));
  EXPECT_FALSE(d.boolean("b2"));
  EXPECT_TRUE(d.boolean("b3"));
  EXPECT_FALSE(d.boolean("b4"));
  EXPECT_EQ(d.i64("i"), -16);
  EXPECT_EQ(d.u64("u"), 8u);
  EXPECT_EQ(d.size("sz"), 1536u);
  EXPECT_EQ(d.size("big"), uint64_t{2} << 30);
  EXPECT_EQ(d.number("n"), 2.5);
  EXPECT_EQ(d.str("s"), "txt");
  EXPECT_EQ(error_of(d), "ok");
}

TEST(ArgDecoderKeyval, ConversionErrors) {
  auto check = [](std::string_view text, auto visit, const std::string& message) {
    nlohmann::json args = keyval(text);
    ArgDecoder d(args, "", true);
    visit(d);
    Result<void> r = d.finish();
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.error().message(), message);
  };
  check(
      "b=maybe", [](ArgDecoder& d) { d.boolean("b"); }, "Parameter 'b' expects 'on' or 'off'");
  check(
      "i=12x", [](ArgDecoder& d) { d.i64("i"); }, "Parameter 'i' expects integer");
  check(
      "i=", [](ArgDecoder& d) { d.i64("i"); }, "Parameter 'i' expects integer");
  check(
      "u=abc", [](ArgDecoder& d) { d.u64("u"); }, "Parameter 'u' expects integer");
  check(
      "s=1.5", [](ArgDecoder& d) { d.size("s"); }, "Parameter 's' expects size");
  check(
      "s=1q", [](ArgDecoder& d) { d.size("s"); }, "Parameter 's' expects size");
  check(
      "s=0x10k", [](ArgDecoder& d) { d.size("s"); }, "Parameter 's' expects size");
  check(
      "s=-1", [](ArgDecoder& d) { d.size("s"); }, "Parameter 's' expects size");
  check(
      "s=16E", [](ArgDecoder& d) { d.size("s"); }, "Parameter 's' expects size");
  check(
      "n=abc", [](ArgDecoder& d) { d.number("n"); },
      "Invalid parameter type for 'n', expected: number");
  check(
      "file.driver=x", [](ArgDecoder& d) { d.str("file"); }, "Parameters 'file.*' are unexpected");
  check(
      "file=x", [](ArgDecoder& d) { d.object("file"); },
      "Invalid parameter type for 'file', expected: object");
  check(
      "e=bogus", [](ArgDecoder& d) { d.enumeration("e", kDiscard); },
      "Parameter 'e' does not accept value 'bogus'");
}

TEST(ArgDecoderKeyval, ListPathsUseDots) {
  nlohmann::json args = keyval("l.0.event=x,l.1.errno=abc");
  ArgDecoder d(args, "", true);
  auto elements = d.opt_list("l");
  ASSERT_TRUE(elements.has_value());
  for (size_t i = 0; i < elements->size(); ++i) {
    ArgDecoder e = d.element_decoder((*elements)[i], i, "l");
    e.opt_str("event");
    e.opt_i64("errno");
    ignore_error(e.finish(), "collected by the parent");
  }
  EXPECT_EQ(error_of(d), "Parameter 'l.1.errno' expects integer");
}

TEST(ArgDecoderKeyval, SizeParsing) {
  EXPECT_EQ(parse_size("0"), 0u);
  EXPECT_EQ(parse_size("512"), 512u);
  EXPECT_EQ(parse_size("512b"), 512u);
  EXPECT_EQ(parse_size("1K"), 1024u);
  EXPECT_EQ(parse_size("64k"), 65536u);
  EXPECT_EQ(parse_size("1M"), 1048576u);
  EXPECT_EQ(parse_size("0.5M"), 524288u);
  EXPECT_EQ(parse_size("1T"), uint64_t{1} << 40);
  EXPECT_EQ(parse_size("15E"), uint64_t{15} << 60);
  EXPECT_EQ(parse_size("0x1000"), 4096u);
  EXPECT_EQ(parse_size(""), std::nullopt);
  EXPECT_EQ(parse_size("k"), std::nullopt);
  EXPECT_EQ(parse_size("18446744073709551616"), std::nullopt);
}

}  // namespace
}  // namespace strata
