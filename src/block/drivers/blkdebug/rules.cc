#include "block/drivers/blkdebug/rules.h"

#include <algorithm>

namespace strata::block::blkdebug {

void RuleEngine::add(const Rule& rule) {
  rules_[static_cast<size_t>(rule.event)].push_front(rule);
}

void RuleEngine::on_event(BlkdebugEvent event) {
  int new_state = state_;
  bool injected = false;
  for (Rule& rule : rules_[static_cast<size_t>(event)]) {
    if (rule.state != 0 && rule.state != state_) {
      continue;
    }
    switch (rule.action) {
      case Rule::Action::kInjectError:
        if (!injected) {
          active_.clear();
          injected = true;
        }
        active_.insert(active_.begin(), &rule);
        break;
      case Rule::Action::kSetState:
        new_state = rule.new_state;
        break;
    }
  }
  state_ = new_state;
}

std::optional<Injection> RuleEngine::check(uint64_t offset, uint64_t bytes, IoType type) {
  auto it = std::find_if(active_.begin(), active_.end(), [&](const Rule* rule) {
    const auto inject_offset = static_cast<uint64_t>(rule->offset);
    const bool in_range = rule->offset == -1 ||
                          (bytes != 0 && inject_offset >= offset && inject_offset < offset + bytes);
    return in_range && (rule->iotype_mask & io_type_bit(type)) != 0;
  });
  if (it == active_.end() || (*it)->error == 0) {
    return std::nullopt;
  }
  Rule* rule = *it;
  Injection injection{rule->error, rule->immediately};
  if (rule->once) {
    active_.erase(it);
    auto& list = rules_[static_cast<size_t>(rule->event)];
    list.remove_if([rule](const Rule& r) { return &r == rule; });
  }
  return injection;
}

size_t RuleEngine::rule_count() const {
  size_t count = 0;
  for (const auto& list : rules_) {
    count += list.size();
  }
  return count;
}

}  // namespace strata::block::blkdebug
