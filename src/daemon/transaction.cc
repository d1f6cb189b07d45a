#include "daemon/transaction.h"

#include <array>
#include <optional>
#include <string_view>

#include "daemon/daemon.h"

namespace strata::daemon {

void TransactionActionTable::add(std::string type, TransactionActionFactory factory,
                                 bool supports_grouped) {
  types_[std::move(type)] = Entry{std::move(factory), supports_grouped};
}

std::vector<std::string> TransactionActionTable::types() const {
  std::vector<std::string> names;
  for (const auto& [name, entry] : types_) {
    names.push_back(name);
  }
  return names;
}

const TransactionActionTable::Entry* TransactionActionTable::find(const std::string& type) const {
  auto it = types_.find(type);
  return it == types_.end() ? nullptr : &it->second;
}

aio::Task<Result<void>> run_transaction(std::vector<std::unique_ptr<TransactionAction>> actions,
                                        std::vector<const TransactionActionTable::Entry*> entries,
                                        std::vector<std::string> types, bool grouped) {
  if (grouped) {
    // QEMU checks every action before preparing any.
    for (size_t i = 0; i < actions.size(); ++i) {
      if (!entries[i]->supports_grouped) {
        co_return make_error(
            ErrorKind::kInvalidArgument,
            "Action '" + types[i] +
                "' does not support transaction property completion-mode = grouped");
      }
    }
    auto txn = block::job::JobManager::new_txn();
    for (auto& action : actions) {
      action->job_txn = txn;
    }
  }
  size_t prepared = 0;
  std::optional<Error> failure;
  for (; prepared < actions.size(); ++prepared) {
    Result<void> result = co_await actions[prepared]->prepare();
    if (!result) {
      failure = std::move(result).error();
      break;
    }
  }
  if (failure) {
    for (size_t i = prepared; i-- > 0;) {
      actions[i]->abort();
    }
    for (size_t i = 0; i < prepared; ++i) {
      actions[i]->clean();
    }
    co_return std::move(*failure);
  }
  for (auto& action : actions) {
    action->commit();
  }
  for (auto& action : actions) {
    action->clean();
  }
  co_return ok();
}

namespace {

// QEMU's `abort` action: fails in its prepare step, so the whole transaction is rolled back.
class AbortAction : public TransactionAction {
 public:
  aio::Task<Result<void>> prepare() override {
    co_return make_error(ErrorKind::kInvalidArgument, "Transaction aborted using Abort action");
  }
};

}  // namespace

void register_transaction_command(Daemon& daemon) {
  daemon.transaction_actions().add(
      "abort", [](Daemon&, ArgDecoder&) { return std::make_unique<AbortAction>(); },
      /*supports_grouped=*/true);
  daemon.command_table().add(
      "transaction",
      [&daemon](const nlohmann::json& args, qmp::Monitor&) -> aio::Task<Result<nlohmann::json>> {
        static constexpr std::array<std::string_view, 2> kModes = {"individual", "grouped"};
        const TransactionActionTable& table = daemon.transaction_actions();
        const std::vector<std::string> type_names = table.types();
        const std::vector<std::string_view> allowed(type_names.begin(), type_names.end());
        ArgDecoder d(args);
        std::vector<nlohmann::json> list = d.list("actions");
        std::vector<std::unique_ptr<TransactionAction>> actions;
        std::vector<const TransactionActionTable::Entry*> entries;
        std::vector<std::string> types;
        for (size_t i = 0; i < list.size() && !d.failed(); ++i) {
          ArgDecoder element = d.element_decoder(list[i], i, "actions");
          std::string type = element.enumeration("type", allowed);
          ArgDecoder data = element.object("data");
          if (d.failed()) {
            break;
          }
          const TransactionActionTable::Entry* entry = table.find(type);
          actions.push_back(entry->factory(daemon, data));
          entries.push_back(entry);
          types.push_back(type);
          ignore_error(data.finish(), "recorded in the shared decoder state");
          ignore_error(element.finish(), "recorded in the shared decoder state");
        }
        bool grouped = false;
        if (auto properties = d.opt_object("properties")) {
          grouped =
              properties->opt_enum("completion-mode", kModes).value_or("individual") == "grouped";
          ignore_error(properties->finish(), "recorded in the shared decoder state");
        }
        auto decoded = d.finish();
        if (!decoded) {
          co_return std::move(decoded).error();
        }
        Result<void> result = co_await run_transaction(std::move(actions), std::move(entries),
                                                       std::move(types), grouped);
        if (!result) {
          co_return std::move(result).error();
        }
        co_return nlohmann::json::object();
      });
}

}  // namespace strata::daemon
