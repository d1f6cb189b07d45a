#pragma once
// The commands a QMP monitor dispatches. The daemon fills the table; the monitor looks commands up
// by name. A handler receives the (possibly absent → empty object) arguments and returns the
// `return` value or an Error whose message becomes the reply's `desc`.

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/task.h"
#include "base/result.h"

namespace strata::qmp {

class Monitor;

using CommandHandler = std::function<aio::Task<Result<nlohmann::json>>(
    const nlohmann::json& arguments, Monitor& caller)>;

struct Command {
  std::string name;
  CommandHandler handler;
  bool allow_oob = false;
};

class CommandTable {
 public:
  void add(std::string name, CommandHandler handler, bool allow_oob = false) {
    commands_[name] = Command{name, std::move(handler), allow_oob};
  }
  const Command* find(const std::string& name) const {
    auto it = commands_.find(name);
    return it == commands_.end() ? nullptr : &it->second;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, command] : commands_) {
      out.push_back(name);
    }
    return out;
  }

 private:
  std::map<std::string, Command> commands_;
};

}  // namespace strata::qmp
