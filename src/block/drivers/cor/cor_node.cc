#include "block/drivers/cor/cor_node.h"

#include <algorithm>

#include "block/io/request.h"

namespace strata::block {

std::unique_ptr<DriverOptions> CorNode::parse(ArgDecoder& d) {
  auto options = std::make_unique<CorOptions>();
  if (auto file = parse_blockdev_ref(d, "file", true)) {
    options->file = std::move(*file);
  }
  options->bottom = d.opt_str("bottom");
  return options;
}

Result<std::shared_ptr<Node>> CorNode::open(OpenContext& context, const BlockdevOptions& options) {
  const auto& o = static_cast<const CorOptions&>(*options.driver_options);
  auto node = std::make_shared<CorNode>(context.options());
  auto file = context.attach(*node, o.file, "file", kRoleFiltered | kRolePrimary);
  if (!file) {
    return std::move(file).error();
  }
  if (o.bottom) {
    // QEMU's cor_open: bottom must be a non-filter node in file's chain.
    Node* bottom = context.graph().find(*o.bottom);
    if (bottom == nullptr) {
      return make_error(ErrorKind::kNotFound, "Bottom node '" + *o.bottom + "' not found");
    }
    bool in_chain = false;
    for (Node* n = (*file)->node(); n != nullptr;) {
      if (n == bottom) {
        in_chain = true;
        break;
      }
      Child* next = n->backing_child() != nullptr ? n->backing_child() : n->primary_child();
      n = next != nullptr ? next->node() : nullptr;
    }
    if (!in_chain) {
      return make_error(ErrorKind::kInvalidArgument, "Bottom node '" + *o.bottom +
                                                         "' is not in the backing chain of '" +
                                                         (*file)->node()->name() + "'");
    }
    node->bottom_ = bottom->shared_from_this();
    node->has_bottom_ = true;
  }
  node->limits_ = (*file)->node()->limits();
  return std::shared_ptr<Node>(std::move(node));
}

void CorNode::child_perm(const Child& child, uint64_t perm, uint64_t shared, uint64_t& child_perm,
                         uint64_t& child_shared) const {
  Node::child_perm(child, perm, shared, child_perm, child_shared);
  child_perm |= kPermWriteUnchanged;
  child_shared |= kPermWriteUnchanged;
}

aio::Task<Result<void>> CorNode::co_preadv(uint64_t offset, uint64_t bytes, IoVector qiov,
                                           uint32_t flags) {
  (void)flags;
  if (!has_bottom_) {
    co_return co_await io::preadv(file(), offset, std::move(qiov), kRequestCopyOnRead);
  }
  // QEMU's cor_co_preadv_part: copy only what lies above the base.
  std::shared_ptr<Node> bottom = bottom_.lock();
  const Node* base = bottom ? filter_or_cow(*bottom) : nullptr;
  for (uint64_t done = 0; done < bytes;) {
    Child* backing = file().backing_child();
    io::Allocation above{false, bytes - done};
    if (backing != nullptr) {
      Result<io::Allocation> found =
          co_await io::is_allocated_above(*backing->node(), base, offset + done, bytes - done);
      if (!found) {
        co_return found.error();
      }
      above = *found;
    }
    const uint32_t read_flags = above.allocated ? uint32_t{kRequestCopyOnRead} : uint32_t{0};
    Result<void> read =
        co_await io::preadv(file(), offset + done, qiov.slice(done, above.bytes), read_flags);
    if (!read) {
      co_return read;
    }
    done += above.bytes;
  }
  co_return ok();
}

aio::Task<Result<void>> CorNode::co_pwritev(uint64_t offset, uint64_t bytes, IoVector qiov,
                                            uint32_t flags) {
  (void)bytes;
  co_return co_await io::pwritev(file(), offset, std::move(qiov), flags);
}

aio::Task<Result<void>> CorNode::co_pwrite_zeroes(uint64_t offset, uint64_t bytes, uint32_t flags) {
  co_return co_await io::pwrite_zeroes(file(), offset, bytes, flags);
}

aio::Task<Result<void>> CorNode::co_pdiscard(uint64_t offset, uint64_t bytes) {
  co_return co_await io::pdiscard(file(), offset, bytes);
}

}  // namespace strata::block
