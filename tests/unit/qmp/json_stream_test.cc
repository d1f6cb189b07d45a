#include "qmp/json_stream.h"

#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace strata::qmp {
namespace {

// Feeds `input` and returns every message as either the value's dump or "ERR: <text>".
std::vector<std::string> drain(JsonStreamParser& parser) {
  std::vector<std::string> out;
  while (std::optional<JsonMessage> message = parser.next()) {
    if (message->ok()) {
      out.push_back(message->value().dump());
    } else {
      out.push_back("ERR: " + message->error().message());
    }
  }
  return out;
}

std::vector<std::string> parse_all(std::string_view input, JsonLimits limits = {}) {
  JsonStreamParser parser(limits);
  parser.feed(input);
  return drain(parser);
}

using Messages = std::vector<std::string>;

TEST(JsonStream, SingleObject) {
  EXPECT_EQ(parse_all(R"({"execute": "query-version"})"),
            Messages{R"({"execute":"query-version"})"});
}

TEST(JsonStream, TwoObjectsInOneFeed) {
  EXPECT_EQ(parse_all(R"({"execute":"a"}{"execute":"b","id":2})"),
            (Messages{R"({"execute":"a"})", R"({"execute":"b","id":2})"}));
}

TEST(JsonStream, ObjectSplitOverFeeds) {
  JsonStreamParser parser;
  parser.feed(R"({"execute":"query-ver)");
  EXPECT_TRUE(parser.in_message());
  EXPECT_FALSE(parser.next().has_value());
  parser.feed(R"(sion")");
  EXPECT_FALSE(parser.next().has_value());
  parser.feed("}\r\n");
  EXPECT_EQ(drain(parser), Messages{R"({"execute":"query-version"})"});
  EXPECT_FALSE(parser.in_message());
}

TEST(JsonStream, ByteByByteEqualsWhole) {
  const std::string input =
      " {\"a\": [1, 2.5, -3e2, true, false, null, \"x\\ny\"], 'b': {'c': \"'\"}}\n[] {} ";
  JsonStreamParser parser;
  for (char c : input) {
    parser.feed(std::string_view(&c, 1));
  }
  EXPECT_EQ(drain(parser), parse_all(input));
  EXPECT_EQ(parse_all(input).size(), 3u);
}

TEST(JsonStream, WhitespaceBetweenIgnored) {
  EXPECT_EQ(parse_all(" \t\r\n{}\n\n {} "), (Messages{"{}", "{}"}));
}

TEST(JsonStream, ScalarNeedsADelimiter) {
  JsonStreamParser parser;
  parser.feed("123");
  EXPECT_FALSE(parser.next().has_value());
  parser.feed(" ");
  EXPECT_EQ(drain(parser), Messages{"123"});
}

TEST(JsonStream, SingleQuotedStringsAndEscapes) {
  EXPECT_EQ(parse_all(R"({'a': 'it\'s "q"', "b": "\u00e9\/\t"})"),
            Messages{R"({"a":"it's \"q\"","b":"é/\t"})"});
}

TEST(JsonStream, SurrogatePair) {
  EXPECT_EQ(parse_all(R"(["\ud83d\ude00"])"), Messages{"[\"\xF0\x9F\x98\x80\"]"});
}

TEST(JsonStream, NulEscapeBecomesNul) {
  auto messages = parse_all(R"(["a\u0000b"])");
  EXPECT_EQ(messages, Messages{R"(["a\u0000b"])"});
}

TEST(JsonStream, IntegersFollowQnumRules) {
  JsonStreamParser parser;
  parser.feed(
      "[9223372036854775807, 9223372036854775808, 18446744073709551616, -9223372036854775809, "
      "-0] ");
  auto message = parser.next();
  ASSERT_TRUE(message && message->ok());
  const nlohmann::json& v = message->value();
  EXPECT_TRUE(v[0].is_number_integer() && !v[0].is_number_unsigned());
  EXPECT_EQ(v[0].get<int64_t>(), INT64_MAX);
  EXPECT_TRUE(v[1].is_number_unsigned());
  EXPECT_EQ(v[1].get<uint64_t>(), uint64_t{9223372036854775808u});
  EXPECT_TRUE(v[2].is_number_float());
  EXPECT_TRUE(v[3].is_number_float());
  EXPECT_TRUE(v[4].is_number_integer());
}

TEST(JsonStream, InvalidKeyword) {
  EXPECT_EQ(parse_all("garbage\n"), Messages{"ERR: JSON parse error, invalid keyword 'garbage'"});
  EXPECT_EQ(parse_all("{\"a\": nul}"), Messages{"ERR: JSON parse error, invalid keyword 'nul'"});
}

TEST(JsonStream, ParserErrorTexts) {
  EXPECT_EQ(parse_all("[1,]"), Messages{"ERR: JSON parse error, expecting value"});
  EXPECT_EQ(parse_all("[1 2]"), Messages{"ERR: JSON parse error, expected separator in list"});
  EXPECT_EQ(parse_all(R"({"a" 1})"), Messages{"ERR: JSON parse error, missing : in object pair"});
  EXPECT_EQ(parse_all(R"({1: 2})"),
            Messages{"ERR: JSON parse error, key is not a string in object"});
  EXPECT_EQ(parse_all(R"({"a": 1 "b": 2})"),
            Messages{"ERR: JSON parse error, expected separator in dict"});
  EXPECT_EQ(parse_all(R"({"a": 1, "a": 2})"), Messages{"ERR: JSON parse error, duplicate key"});
  EXPECT_EQ(parse_all(R"({"a":})"), Messages{"ERR: JSON parse error, expecting value"});
  EXPECT_EQ(parse_all("]"), Messages{"ERR: JSON parse error, expecting value"});
  EXPECT_EQ(parse_all(":"), Messages{"ERR: JSON parse error, expecting value"});
  EXPECT_EQ(parse_all(R"(["\q"])"),
            Messages{"ERR: JSON parse error, invalid escape sequence in string"});
  EXPECT_EQ(parse_all(R"(["\ud800"])"),
            Messages{"ERR: JSON parse error, \\ud800 is not a valid Unicode character"});
  EXPECT_EQ(parse_all(R"(["\u12"])"),
            Messages{"ERR: JSON parse error, \\u12\" is not a valid Unicode character"});
  EXPECT_EQ(parse_all("[\"\xC3\x28\"]"),
            Messages{"ERR: JSON parse error, invalid UTF-8 sequence in string"});
}

TEST(JsonStream, StrayCharacters) {
  // A lexical error reports the offending token, then the lexer skips to a resync point.
  EXPECT_EQ(parse_all("\f"), Messages{"ERR: JSON parse error, stray '\f'"});
  EXPECT_EQ(parse_all("Garbage\n{}"), (Messages{"ERR: JSON parse error, stray 'G'", "{}"}));
  // 0xFF is reported as U+FFFD, the way QEMU's writer prints it.
  EXPECT_EQ(parse_all("\xff{}"), (Messages{"ERR: JSON parse error, stray '\xEF\xBF\xBD'", "{}"}));
  // NUL: QEMU prints the token as a C string.
  EXPECT_EQ(parse_all(std::string_view("\0{}", 3)),
            (Messages{"ERR: JSON parse error, stray ''", "{}"}));
}

TEST(JsonStream, UnterminatedStringRecoversOnControlCharacter) {
  // A raw newline cannot be part of a string: the partial token is reported, the rest of the
  // line is skipped up to the next structural character.
  EXPECT_EQ(parse_all("{\"execute\": \"qu\nery\"}{\"a\":1}"),
            (Messages{"ERR: JSON parse error, stray '\"qu\n'",
                      "ERR: JSON parse error, expecting value", "{\"a\":1}"}));
}

TEST(JsonStream, LeadingZeroIsAnError) {
  EXPECT_EQ(parse_all("[01]"), (Messages{"ERR: JSON parse error, stray '01'",
                                         "ERR: JSON parse error, expecting value"}));
}

TEST(JsonStream, ResyncWithControlCharacterAfterBrokenMessage) {
  JsonStreamParser parser;
  parser.feed(R"({"execute": "x", "arguments": {)");
  parser.feed("\x01");  // the client forces a reset mid-message
  parser.feed(R"({"execute":"ok"})");
  EXPECT_EQ(drain(parser),
            (Messages{"ERR: JSON parse error, stray '\x01'", R"({"execute":"ok"})"}));
}

TEST(JsonStream, ErrorThenGoodObjectInSameFeed) {
  EXPECT_EQ(parse_all("garbage {\"a\":1}"),
            (Messages{"ERR: JSON parse error, invalid keyword 'garbage'", R"({"a":1})"}));
}

TEST(JsonStream, NegativeBraceCountInsideBracketsKeepsCollecting) {
  // QEMU's streamer checks bracket_count twice, so '[}' does not end the message.
  JsonStreamParser parser;
  parser.feed("[}");
  EXPECT_FALSE(parser.next().has_value());
  parser.feed("]");
  EXPECT_EQ(drain(parser), Messages{"ERR: JSON parse error, expecting value"});
}

TEST(JsonStream, NestingLimit) {
  JsonLimits limits;
  limits.max_nesting = 4;
  EXPECT_EQ(parse_all("[[[[1]]]]", limits), Messages{"[[[[1]]]]"});
  // After the error the rest is lexed afresh: "1" is a value of its own, each ']' an error.
  EXPECT_EQ(
      parse_all("[[[[[1]]]]]\n{}", limits),
      (Messages{"ERR: JSON nesting depth limit exceeded", "1",
                "ERR: JSON parse error, expecting value", "ERR: JSON parse error, expecting value",
                "ERR: JSON parse error, expecting value", "ERR: JSON parse error, expecting value",
                "ERR: JSON parse error, expecting value", "{}"}));
}

TEST(JsonStream, DefaultNestingLimitIsQemus) {
  std::string deep(1024, '[');
  deep += std::string(1024, ']');
  EXPECT_EQ(parse_all(deep).size(), 1u);
  EXPECT_TRUE(parse_all(deep)[0].rfind("[[", 0) == 0);
  std::string deeper(1025, '[');
  EXPECT_EQ(parse_all(deeper), Messages{"ERR: JSON nesting depth limit exceeded"});
}

TEST(JsonStream, TokenCountLimit) {
  JsonLimits limits;
  limits.max_token_count = 5;
  EXPECT_EQ(parse_all("[1,2]", limits), Messages{"[1,2]"});
  auto messages = parse_all("[1,2,3]", limits);
  ASSERT_FALSE(messages.empty());
  EXPECT_EQ(messages[0], "ERR: JSON token count limit exceeded");
}

TEST(JsonStream, TokenSizeLimit) {
  JsonLimits limits;
  limits.max_token_size = 16;
  auto messages = parse_all("[\"" + std::string(40, 'a') + "\"]\n{}", limits);
  ASSERT_FALSE(messages.empty());
  EXPECT_EQ(messages[0], "ERR: JSON token size limit exceeded");
  EXPECT_EQ(messages.back(), "{}");
}

TEST(JsonStream, FlushFinishesPendingInput) {
  JsonStreamParser parser;
  parser.feed("{\"a\":");
  parser.flush();
  EXPECT_EQ(drain(parser), Messages{"ERR: JSON parse error, premature EOI"});
  parser.feed("42");
  parser.flush();
  EXPECT_EQ(drain(parser), Messages{"42"});
}

TEST(JsonStream, ParseJsonText) {
  EXPECT_EQ(parse_json_text(R"({"driver": "null-co"})")->dump(), R"({"driver":"null-co"})");
  EXPECT_EQ(parse_json_text("").error().message(), "Expecting a JSON value");
  EXPECT_EQ(parse_json_text("{} {}").error().message(), "Expecting at most one JSON value");
  EXPECT_EQ(parse_json_text("{").error().message(), "JSON parse error, premature EOI");
  EXPECT_EQ(parse_json_text("{\"a\": X}").error().message(), "JSON parse error, stray 'X'");
}

TEST(JsonStream, NeverThrowsOnArbitraryBytes) {
  std::string bytes;
  for (int i = 0; i < 256; ++i) {
    bytes.push_back(static_cast<char>(i));
    bytes.push_back('{');
    bytes.push_back('"');
  }
  JsonStreamParser parser;
  EXPECT_NO_THROW(parser.feed(bytes));
  EXPECT_NO_THROW(parser.flush());
  EXPECT_NO_THROW(drain(parser));
}

}  // namespace
}  // namespace strata::qmp
