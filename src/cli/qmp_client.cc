#include "cli/qmp_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace strata::cli {

Result<QmpClient> QmpClient::connect(const std::string& path, int greeting_timeout_ms) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path)) {
    return make_error(ErrorKind::kInvalidArgument,
                      "cannot connect to '" + path + "': socket path is empty or too long");
  }
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return Error::from_errno(errno, "cannot create a unix socket");
  }
  QmpClient client(fd);
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    return Error::from_errno(errno, "cannot connect to '" + path + "'");
  }

  auto greeting = client.read_message(greeting_timeout_ms);
  if (!greeting.ok()) {
    return std::move(greeting).error().with_prefix("no QMP greeting from '" + path + "'");
  }
  if (!greeting->has_value()) {
    return make_error(ErrorKind::kTimeout, "no QMP greeting from '" + path + "' within " +
                                               std::to_string(greeting_timeout_ms / 1000) +
                                               " s (is another client connected to this monitor?)");
  }
  if (!(*greeting)->is_object() || !(*greeting)->contains("QMP")) {
    return make_error(
        ErrorKind::kProtocol,
        "'" + path + "' is not a QMP monitor: it greeted with " + format_json(**greeting, false));
  }
  client.greeting_ = std::move(**greeting);

  auto reply = client.execute(Json{{"execute", "qmp_capabilities"}}, [](const Json&) {});
  if (!reply.ok()) {
    return std::move(reply).error().with_prefix("qmp_capabilities failed");
  }
  if (reply->contains("error")) {
    return make_error(ErrorKind::kProtocol,
                      "qmp_capabilities failed: " + (*reply)["error"].value("desc", std::string()));
  }
  return client;
}

QmpClient::QmpClient(QmpClient&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)),
      buffer_(std::move(other.buffer_)),
      greeting_(std::move(other.greeting_)) {}

QmpClient& QmpClient::operator=(QmpClient&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    fd_ = std::exchange(other.fd_, -1);
    buffer_ = std::move(other.buffer_);
    greeting_ = std::move(other.greeting_);
  }
  return *this;
}

QmpClient::~QmpClient() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
}

Result<void> QmpClient::send_text(std::string_view text) {
  std::string line(text);
  line += '\n';
  size_t sent = 0;
  while (sent < line.size()) {
    ssize_t n = ::send(fd_, line.data() + sent, line.size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return Error::from_errno(errno, "cannot send to the QMP server");
    }
    sent += static_cast<size_t>(n);
  }
  return ok();
}

// Pops complete lines off buffer_ until one holds a message; blank lines are skipped.
std::optional<Json> QmpClient::take_buffered_line(Result<void>& parse_result) {
  for (;;) {
    size_t end = buffer_.find('\n');
    if (end == std::string::npos) {
      return std::nullopt;
    }
    std::string line = buffer_.substr(0, end);
    buffer_.erase(0, end + 1);
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      continue;
    }
    try {
      return Json::parse(line);
    } catch (const Json::parse_error& e) {
      parse_result = make_error(ErrorKind::kProtocol,
                                std::string("the QMP server sent invalid JSON: ") + e.what());
      return std::nullopt;
    }
  }
}

Result<std::optional<Json>> QmpClient::read_message(int timeout_ms) {
  for (;;) {
    Result<void> parsed = ok();
    std::optional<Json> message = take_buffered_line(parsed);
    if (!parsed.ok()) {
      return std::move(parsed).error();
    }
    if (message.has_value()) {
      return message;
    }

    pollfd pfd{fd_, POLLIN, 0};
    int ready = ::poll(&pfd, 1, timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) {
        continue;
      }
      return Error::from_errno(errno, "cannot wait for the QMP server");
    }
    if (ready == 0) {
      return std::optional<Json>();
    }
    char chunk[65536];
    ssize_t n = ::recv(fd_, chunk, sizeof(chunk), 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) {
        continue;
      }
      if (errno != ECONNRESET) {
        return Error::from_errno(errno, "cannot read from the QMP server");
      }
      n = 0;  // the server closed while our last request was in flight (e.g. after quit)
    }
    if (n == 0) {
      return make_error(ErrorKind::kProtocol, "connection closed by the QMP server");
    }
    buffer_.append(chunk, static_cast<size_t>(n));
  }
}

Result<Json> QmpClient::execute_text(std::string_view request,
                                     const std::function<void(const Json&)>& on_event) {
  if (auto sent = send_text(request); !sent.ok()) {
    return std::move(sent).error();
  }
  for (;;) {
    auto message = read_message(-1);
    if (!message.ok()) {
      return std::move(message).error();
    }
    Json& value = **message;
    if (value.is_object() && value.contains("event")) {
      on_event(value);
      continue;
    }
    return std::move(value);
  }
}

// ---- request syntax -----------------------------------------------------------------------------

std::vector<std::string> split_command_line(std::string_view line) {
  // qmp_shell.py: re.findall(r'''(?:[^\s"']|"(?:\\.|[^"])*"|'(?:\\.|[^'])*')+''', cmdline)
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  size_t i = 0;
  auto is_space = [](char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
  };
  while (i < line.size()) {
    char c = line[i];
    if (is_space(c)) {
      if (in_word) {
        words.push_back(std::move(word));
        word.clear();
        in_word = false;
      }
      ++i;
      continue;
    }
    in_word = true;
    if (c == '"' || c == '\'') {
      // A quoted run up to the matching quote; an unterminated one takes the rest of the line.
      word += c;
      ++i;
      while (i < line.size() && line[i] != c) {
        if (line[i] == '\\' && i + 1 < line.size()) {
          word += line[i++];
        }
        word += line[i++];
      }
      if (i < line.size()) {
        word += line[i++];
      }
      continue;
    }
    word += c;
    ++i;
  }
  if (in_word) {
    words.push_back(std::move(word));
  }
  return words;
}

Json parse_value(const std::string& text) {
  Json value = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) {
    return Json(text);
  }
  return value;
}

Result<Json> parse_key_values(const std::vector<std::string>& words) {
  Json arguments = Json::object();
  for (const std::string& word : words) {
    size_t equals = word.find('=');
    if (equals == std::string::npos) {
      return make_error(ErrorKind::kInvalidArgument,
                        "Expected a key=value pair, got '" + word + "'");
    }
    std::string key = word.substr(0, equals);
    Json value = parse_value(word.substr(equals + 1));

    Json* parent = &arguments;
    std::string path;
    size_t start = 0;
    for (;;) {
      size_t dot = key.find('.', start);
      std::string part =
          key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (dot == std::string::npos) {
        if (parent->contains(part)) {
          if ((*parent)[part].is_object()) {
            return make_error(ErrorKind::kInvalidArgument,
                              "Cannot use \"" + key + "\" as both leaf and non-leaf key");
          }
          return make_error(ErrorKind::kInvalidArgument,
                            "Cannot set \"" + key + "\" multiple times");
        }
        (*parent)[part] = std::move(value);
        break;
      }
      path += (path.empty() ? "" : ".") + part;
      if (!parent->contains(part)) {
        (*parent)[part] = Json::object();
      }
      Json& child = (*parent)[part];
      if (!child.is_object()) {
        return make_error(ErrorKind::kInvalidArgument,
                          "Cannot use \"" + path + "\" as both leaf and non-leaf key");
      }
      parent = &child;
      start = dot + 1;
    }
  }
  return arguments;
}

Result<Json> build_request(const std::string& command, const std::vector<std::string>& key_values) {
  auto arguments = parse_key_values(key_values);
  if (!arguments.ok()) {
    return std::move(arguments).error();
  }
  Json request = {{"execute", command}};
  if (!arguments->empty()) {
    request["arguments"] = std::move(*arguments);
  }
  return request;
}

std::string format_json(const Json& value, bool pretty) {
  return value.dump(pretty ? 2 : -1, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace);
}

}  // namespace strata::cli
