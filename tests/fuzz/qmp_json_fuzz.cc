// Feeds arbitrary bytes to the QMP JSON stream parser in chunks whose sizes come from the input
// itself, drains every message, and checks that chunking never changes the result.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "qmp/json_stream.h"

namespace {

std::vector<std::string> run(std::string_view data, const std::vector<size_t>& chunks) {
  strata::qmp::JsonLimits limits;
  limits.max_nesting = 64;  // keep the deep-nesting paths reachable with small inputs
  limits.max_token_count = 4096;
  limits.max_token_size = 1 << 16;
  strata::qmp::JsonStreamParser parser(limits);
  std::vector<std::string> out;
  auto drain = [&] {
    while (auto message = parser.next()) {
      // Dumping with strict UTF-8 handling proves values and error texts are valid UTF-8.
      out.push_back(message->ok() ? message->value().dump() : "E" + message->error().message());
    }
  };
  size_t pos = 0;
  size_t i = 0;
  while (pos < data.size()) {
    size_t n = chunks.empty() ? data.size() : chunks[i++ % chunks.size()];
    n = std::min(n, data.size() - pos);
    parser.feed(data.substr(pos, n));
    pos += n;
    drain();
  }
  parser.flush();
  drain();
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) {
    return 0;
  }
  // The first byte picks the chunking pattern.
  std::vector<size_t> chunks;
  uint8_t pattern = data[0];
  for (int k = 0; k < 4; ++k) {
    chunks.push_back(static_cast<size_t>(((pattern >> (2 * k)) & 3) * 3 + 1));
  }
  std::string_view bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::vector<std::string> whole = run(bytes, {});
  std::vector<std::string> split = run(bytes, chunks);
  if (whole != split) {
    std::abort();
  }
  return 0;
}
