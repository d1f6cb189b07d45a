// The block graph (block/graph/graph.h) with the real drivers: permissions by child role, conflicts
// and their rollback, read-only and auto-read-only, cycles, activation, QEMU's lock bytes on image
// files, node names and failed opens. Expected texts and permission sets are QEMU 10.0's; where a
// comment says "observed", it was checked against qemu-storage-daemon 10.0.2.

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <regex>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "block/drivers/file/file_node.h"
#include "block/graph/graph.h"
#include "block/graph/image_lock.h"
#include "graph_test_util.h"

namespace strata::block {
namespace {

using testing::access_mode;
using testing::error_of;
using testing::inode_of;
using testing::locked_bytes;
using testing::open_node;
using testing::TempDir;
using testing::TestUser;

constexpr uint64_t kRead = kPermConsistentRead;
constexpr uint64_t kWrite = kPermWrite;
constexpr uint64_t kUnchanged = kPermWriteUnchanged;
constexpr uint64_t kResize = kPermResize;
constexpr uint64_t kAll = kPermAll;

// A root edge that is detached when it goes out of scope.
class Root {
 public:
  Root(Graph& graph, std::unique_ptr<Child> child) : graph_(&graph), child_(std::move(child)) {}
  Root(Root&&) = default;
  Root& operator=(Root&&) = delete;
  ~Root() { reset(); }
  void reset() {
    if (child_) {
      graph_->detach_root(std::move(child_));
    }
  }
  Child& operator*() const { return *child_; }
  Child* operator->() const { return child_.get(); }

 private:
  Graph* graph_;
  std::unique_ptr<Child> child_;
};

Result<Root> attach(Graph& graph, TestUser& user, const std::shared_ptr<Node>& node, uint64_t perm,
                    uint64_t shared) {
  auto child = graph.attach_root(user, node, "root", kRoleImage, perm, shared);
  if (!child) {
    return std::move(child).error();
  }
  return Root(graph, std::move(child).value());
}

class GraphTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(dir_.ok()); }

  Result<std::shared_ptr<Node>> add(const nlohmann::json& options) {
    return open_node(graph_, options);
  }
  Result<Root> attach(TestUser& user, const std::shared_ptr<Node>& node, uint64_t perm,
                      uint64_t shared) {
    return block::attach(graph_, user, node, perm, shared);
  }
  FileNode* file_node(const std::string& name) {
    return dynamic_cast<FileNode*>(graph_.find(name));
  }

  TempDir dir_;
  Graph graph_;
  TestUser user_a_{"block device 'a'"};
  TestUser user_b_{"block device 'b'"};
};

nlohmann::json null_co(const std::string& name, uint64_t size = 1 << 20) {
  return {{"driver", "null-co"}, {"node-name", name}, {"size", size}};
}

// ---- permissions by role ----------------------------------------------------------------------

TEST_F(GraphTest, PlainRawPassesPermissionsThroughAsAFilter) {
  auto n = add(null_co("n"));
  ASSERT_TRUE(n) << error_of(n);
  auto r = add({{"driver", "raw"}, {"node-name", "r"}, {"file", "n"}});
  ASSERT_TRUE(r) << error_of(r);
  Child* file = (*r)->child("file");
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->role(), kRoleFiltered | kRolePrimary);
  EXPECT_EQ(file->perm(), 0u);
  EXPECT_EQ(file->shared(), kAll);
  {
    // A writable export: takes consistent-read and write, shares all but resize.
    auto user = attach(user_a_, *r, kRead | kWrite, kRead | kWrite | kUnchanged);
    ASSERT_TRUE(user) << error_of(user);
    EXPECT_EQ(file->perm(), kRead | kWrite);
    EXPECT_EQ(file->shared(), kRead | kWrite | kUnchanged);
    EXPECT_EQ((*n)->cumulative_perm(), kRead | kWrite);
  }
  EXPECT_EQ(file->perm(), 0u);
  EXPECT_EQ(file->shared(), kAll);
}

// QEMU's raw_open makes the file a DATA child when there is a window, and raw_child_perm drops the
// WRITE/RESIZE that bdrv_default_perms adds for data children unless raw's parents take them
// (observed: a writable NBD export on raw offset=512 gives the file edge
// perm [write, consistent-read], shared [write-unchanged, write, consistent-read]).
TEST_F(GraphTest, RawWindowTakesDataRolePermissions) {
  auto n = add(null_co("n"));
  ASSERT_TRUE(n) << error_of(n);
  auto r = add({{"driver", "raw"}, {"node-name", "r"}, {"file", "n"}, {"offset", 512}});
  ASSERT_TRUE(r) << error_of(r);
  Child* file = (*r)->child("file");
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->role(), kRoleData | kRolePrimary);
  // No users: nothing taken, but resize is never shared under a data child.
  EXPECT_EQ(file->perm(), 0u);
  EXPECT_EQ(file->shared(), kRead | kWrite | kUnchanged);
  {
    auto user = attach(user_a_, *r, kRead | kWrite, kAll);
    ASSERT_TRUE(user) << error_of(user);
    EXPECT_EQ(file->perm(), kRead | kWrite);
    EXPECT_EQ(file->shared(), kRead | kWrite | kUnchanged);
  }
  {
    // write-unchanged does not turn into write (raw's data is the file's data).
    auto user = attach(user_a_, *r, kRead | kUnchanged, kAll);
    ASSERT_TRUE(user) << error_of(user);
    EXPECT_EQ(file->perm(), kRead | kUnchanged);
  }
  {
    auto user = attach(user_a_, *r, kRead, kRead | kUnchanged);
    ASSERT_TRUE(user) << error_of(user);
    EXPECT_EQ(file->perm(), kRead);
    EXPECT_EQ(file->shared(), kRead | kUnchanged);
  }
}

// bdrv_default_perms by role, on a driver that does not override child_perm.
TEST_F(GraphTest, DefaultPermissionsByRole) {
  auto parent = add(null_co("p"));
  auto read_only = add({{"driver", "null-co"}, {"node-name", "ro"}, {"read-only", true}});
  auto inactive = add({{"driver", "null-co"}, {"node-name", "in"}, {"active", false}});
  auto target = add(null_co("t"));
  ASSERT_TRUE(parent && read_only && inactive && target);

  struct Case {
    const char* what;
    const std::shared_ptr<Node>& node;
    uint32_t role;
    uint64_t perm, shared;            // the parent node's cumulative permissions
    uint64_t want_perm, want_shared;  // what it takes and shares on the child
  };
  const Case cases[] = {
      {"filtered", *parent, kRoleFiltered | kRolePrimary, kRead | kWrite | kResize,
       kRead | kUnchanged, kRead | kWrite | kResize, kRead | kUnchanged},
      {"cow", *parent, kRoleCow, kRead | kWrite, kAll, kRead, kAll},
      {"cow, parent unshares write", *parent, kRoleCow, kRead | kWrite, kAll & ~kWrite, kRead,
       kRead | kUnchanged},
      {"cow under an inactive parent", *inactive, kRoleCow, kRead, kRead, kRead, kAll},
      {"metadata of a writable node", *parent, kRoleMetadata, 0, kAll, kRead | kWrite | kResize,
       kRead | kUnchanged},
      {"metadata of a read-only node", *read_only, kRoleMetadata, 0, kAll, kRead,
       kRead | kUnchanged},
      {"image (metadata and data)", *parent, kRoleImage, kRead, kAll, kRead | kWrite | kResize,
       kRead | kUnchanged},
      {"data, write-unchanged", *parent, kRoleData, kUnchanged, kAll, kUnchanged | kWrite | kResize,
       kAll & ~kResize},
      {"data, read", *parent, kRoleData, kRead, kAll, kRead, kAll & ~kResize},
      {"data under an inactive parent", *inactive, kRoleData, kRead, kRead, kRead,
       kRead | kWrite | kResize},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Child edge(c.node.get(), c.node.get(), *target, "child", c.role);
    uint64_t perm = 0;
    uint64_t shared = 0;
    c.node->child_perm(edge, c.perm, c.shared, perm, shared);
    EXPECT_EQ(perm_names(perm), perm_names(c.want_perm));
    EXPECT_EQ(perm_names(shared), perm_names(c.want_shared));
  }
}

// ---- conflicts --------------------------------------------------------------------------------

TEST_F(GraphTest, WriterAndNonSharerConflictInEitherOrder) {
  auto x = add(null_co("x"));
  ASSERT_TRUE(x) << error_of(x);
  const std::string expected =
      "Permission conflict on node 'x': permissions 'write' are both required by block device "
      "'a' (uses node 'x' as 'root' child) and unshared by block device 'b' (uses node 'x' as "
      "'root' child).";
  {
    auto writer = attach(user_a_, *x, kRead | kWrite, kAll);
    ASSERT_TRUE(writer) << error_of(writer);
    auto reader = attach(user_b_, *x, kRead, kAll & ~kWrite);
    ASSERT_FALSE(reader);
    EXPECT_EQ(reader.error().message(), expected);
    EXPECT_EQ(reader.error().kind(), ErrorKind::kPermission);
    ASSERT_EQ((*x)->parents().size(), 1u);
    EXPECT_EQ((*x)->cumulative_perm(), kRead | kWrite);
    EXPECT_EQ((*x)->cumulative_shared(), kAll);
  }
  EXPECT_TRUE((*x)->parents().empty());
  {
    auto reader = attach(user_b_, *x, kRead, kAll & ~kWrite);
    ASSERT_TRUE(reader) << error_of(reader);
    auto writer = attach(user_a_, *x, kRead | kWrite, kAll);
    ASSERT_FALSE(writer);
    EXPECT_EQ(writer.error().message(), expected);
    ASSERT_EQ((*x)->parents().size(), 1u);
    EXPECT_EQ((*x)->cumulative_perm(), kRead);
  }
}

// When both users refuse each other, QEMU reports the older one as the one requiring the
// permission: it keeps a node's parents newest first and checks each against the others
// (observed: two qcow2 nodes q1, q2 on one file give "permissions 'write, resize' are both
// required by node 'q1' (...) and unshared by node 'q2' (...)").
TEST_F(GraphTest, MutualConflictNamesTheOlderUserAsRequiring) {
  auto x = add(null_co("x"));
  ASSERT_TRUE(x) << error_of(x);
  auto first = attach(user_a_, *x, kRead | kWrite, kRead | kUnchanged);
  ASSERT_TRUE(first) << error_of(first);
  auto second = attach(user_b_, *x, kRead | kWrite, kRead | kUnchanged);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().message(),
            "Permission conflict on node 'x': permissions 'write' are both required by block "
            "device 'a' (uses node 'x' as 'root' child) and unshared by block device 'b' (uses "
            "node 'x' as 'root' child).");
}

// A conflict found below the node the user attaches to rolls back every edge changed on the way
// and the lock bytes of the file.
TEST_F(GraphTest, ConflictRollsBackEdgesAndLocks) {
  std::string path = dir_.file("img", 1 << 20);
  auto f = add({{"driver", "file"}, {"node-name", "f"}, {"filename", path}});
  ASSERT_TRUE(f) << error_of(f);
  auto r = add({{"driver", "raw"}, {"node-name", "r"}, {"file", "f"}});
  ASSERT_TRUE(r) << error_of(r);
  if (!ImageLock::ofd_supported()) {
    GTEST_SKIP() << "kernel without OFD locks";
  }
  auto blocker = attach(user_b_, *f, kRead, kAll & ~kWrite);
  ASSERT_TRUE(blocker) << error_of(blocker);
  const std::vector<int> locks_before = {100, 201};
  ASSERT_EQ(locked_bytes(inode_of(path)), locks_before);

  auto writer = attach(user_a_, *r, kRead | kWrite, kAll);
  ASSERT_FALSE(writer);
  EXPECT_EQ(writer.error().message(),
            "Permission conflict on node 'f': permissions 'write' are both required by node 'r' "
            "(uses node 'f' as 'file' child) and unshared by block device 'b' (uses node 'f' as "
            "'root' child).");
  Child* file = (*r)->child("file");
  EXPECT_EQ(file->perm(), 0u);
  EXPECT_EQ(file->shared(), kAll);
  EXPECT_TRUE((*r)->parents().empty());
  EXPECT_EQ(locked_bytes(inode_of(path)), locks_before);

  // The same through set_root_perm: the user keeps what it had.
  auto reader = attach(user_a_, *r, kRead, kAll);
  ASSERT_TRUE(reader) << error_of(reader);
  auto upgraded = graph_.set_root_perm(**reader, kRead | kWrite, kAll);
  ASSERT_FALSE(upgraded);
  EXPECT_EQ(upgraded.error().message(), writer.error().message());
  EXPECT_EQ((*reader)->perm(), kRead);
  EXPECT_EQ(file->perm(), kRead);
  EXPECT_EQ(locked_bytes(inode_of(path)), locks_before);
}

// ---- read-only and auto-read-only ---------------------------------------------------------------

TEST_F(GraphTest, WriterRefusedOnReadOnlyNode) {
  std::string path = dir_.file("img", 1 << 20);
  auto f = add({{"driver", "file"}, {"node-name", "f"}, {"filename", path}, {"read-only", true}});
  ASSERT_TRUE(f) << error_of(f);
  auto writer = attach(user_a_, *f, kRead | kWrite, kAll);
  ASSERT_FALSE(writer);
  EXPECT_EQ(writer.error().message(), "Block node is read-only");
  EXPECT_TRUE((*f)->parents().empty());
  EXPECT_TRUE(locked_bytes(inode_of(path)).empty());

  // Inline children inherit read-only: the raw node on top refuses the writer itself.
  auto r = add({{"driver", "raw"},
                {"node-name", "r"},
                {"read-only", true},
                {"file", {{"driver", "file"}, {"node-name", "g"}, {"filename", path}}}});
  ASSERT_TRUE(r) << error_of(r);
  EXPECT_TRUE(graph_.find("g")->is_read_only());
  auto unchanged = attach(user_a_, *r, kRead | kUnchanged, kAll);
  ASSERT_FALSE(unchanged);
  EXPECT_EQ(unchanged.error().message(), "Block node is read-only");
  auto reader = attach(user_a_, *r, kRead, kAll);
  EXPECT_TRUE(reader) << error_of(reader);
}

TEST_F(GraphTest, AutoReadOnlyReopensReadWriteForTheFirstWriter) {
  std::string path = dir_.file("img", 1 << 20);
  auto r = add({{"driver", "raw"},
                {"node-name", "r"},
                {"auto-read-only", true},
                {"file", {{"driver", "file"}, {"node-name", "f"}, {"filename", path}}}});
  ASSERT_TRUE(r) << error_of(r);
  FileNode* f = file_node("f");
  ASSERT_NE(f, nullptr);
  EXPECT_FALSE(f->is_read_only());
  EXPECT_EQ(access_mode(f->data_fd()), O_RDONLY);
  {
    auto reader = attach(user_b_, *r, kRead, kAll);
    ASSERT_TRUE(reader) << error_of(reader);
    EXPECT_EQ(access_mode(f->data_fd()), O_RDONLY);
    auto writer = attach(user_a_, *r, kRead | kWrite, kAll);
    ASSERT_TRUE(writer) << error_of(writer);
    EXPECT_EQ(access_mode(f->data_fd()), O_RDWR);
    EXPECT_TRUE(f->data_fd_writable());
    if (ImageLock::ofd_supported()) {
      // The lock bytes moved to the new descriptor; the old one is closed.
      EXPECT_EQ(locked_bytes(inode_of(path)), (std::vector<int>{100, 101}));
    }
    writer->reset();
    EXPECT_EQ(access_mode(f->data_fd()), O_RDONLY);
    EXPECT_FALSE(f->data_fd_writable());
    if (ImageLock::ofd_supported()) {
      EXPECT_EQ(locked_bytes(inode_of(path)), (std::vector<int>{100}));
    }
  }
  EXPECT_EQ(access_mode(f->data_fd()), O_RDONLY);
  EXPECT_TRUE(locked_bytes(inode_of(path)).empty());
}

// Clears the immutable attribute again so the temporary directory can be removed.
class ImmutableFile {
 public:
  explicit ImmutableFile(std::string path) : path_(std::move(path)) {
    set_ = std::system(("chattr +i '" + path_ + "' 2>/dev/null").c_str()) == 0;
  }
  ~ImmutableFile() {
    if (set_) {
      int ignored = std::system(("chattr -i '" + path_ + "' 2>/dev/null").c_str());
      (void)ignored;
    }
  }
  ImmutableFile(const ImmutableFile&) = delete;
  ImmutableFile& operator=(const ImmutableFile&) = delete;
  bool set() const { return set_; }

 private:
  std::string path_;
  bool set_ = false;
};

TEST_F(GraphTest, FailedReopenReadWriteKeepsTheOldDescriptor) {
  std::string path = dir_.file("img", 1 << 20);
  auto f =
      add({{"driver", "file"}, {"node-name", "f"}, {"filename", path}, {"auto-read-only", true}});
  ASSERT_TRUE(f) << error_of(f);
  FileNode* file = file_node("f");
  ASSERT_NE(file, nullptr);
  const int old_fd = file->data_fd();
  ImmutableFile immutable(path);
  if (!immutable.set()) {
    GTEST_SKIP() << "chattr +i is not available here";
  }
  auto writer = attach(user_a_, *f, kRead | kWrite, kAll);
  ASSERT_FALSE(writer);
  EXPECT_EQ(writer.error().message(), "Could not open '" + path + "': Operation not permitted");
  EXPECT_EQ(file->data_fd(), old_fd);
  EXPECT_EQ(access_mode(file->data_fd()), O_RDONLY);
  EXPECT_FALSE(file->data_fd_writable());
  EXPECT_TRUE((*f)->parents().empty());
  if (ImageLock::ofd_supported()) {
    EXPECT_TRUE(locked_bytes(inode_of(path)).empty());
  }
  // Readers still work on the old descriptor.
  auto reader = attach(user_b_, *f, kRead, kAll);
  ASSERT_TRUE(reader) << error_of(reader);
  EXPECT_EQ(file->data_fd(), old_fd);
}

// ---- cycles -------------------------------------------------------------------------------------

TEST_F(GraphTest, EdgesThatWouldCreateACycleAreRefused) {
  auto n = add(null_co("n"));
  auto a = add({{"driver", "raw"}, {"node-name", "a"}, {"file", "n"}});
  auto b = add({{"driver", "raw"}, {"node-name", "b"}, {"file", "a"}});
  ASSERT_TRUE(n && a && b);

  auto attached = graph_.attach_child(**a, *b, "file", kRoleFiltered | kRolePrimary);
  ASSERT_FALSE(attached);
  EXPECT_EQ(attached.error().message(), "Making 'b' a file child of 'a' would create a cycle");
  EXPECT_EQ((*a)->children().size(), 1u);
  EXPECT_TRUE((*b)->parents().empty());

  auto self = graph_.attach_child(**a, *a, "backing", kRoleCow);
  ASSERT_FALSE(self);
  EXPECT_EQ(self.error().message(), "Making 'a' a backing child of 'a' would create a cycle");

  auto replaced = graph_.replace_child((*a)->child("file"), *b);
  ASSERT_FALSE(replaced);
  EXPECT_EQ(replaced.error().message(), "Making 'b' a file child of 'a' would create a cycle");
  EXPECT_EQ((*a)->child("file")->node(), n->get());
  EXPECT_EQ((*n)->parents().size(), 1u);
}

// ---- replacing a node ---------------------------------------------------------------------------

// A job's edge: it stays at its node when the node is replaced (QEMU's stay_at_node).
class StayingUser : public TestUser {
 public:
  using TestUser::TestUser;
  bool stays_at_node() const override { return true; }
};

TEST_F(GraphTest, ReplaceNodeMovesUsersButNotJobsNorTheReplacementsOwnEdge) {
  // A filter inserted above `n` the way a mirror job does it: the filter's own edge to `n`
  // stays (moving it would be a cycle), the export moves onto the filter, the job stays.
  auto n = add(null_co("n"));
  auto filter = add({{"driver", "raw"}, {"node-name", "filter"}, {"file", "n"}});
  ASSERT_TRUE(n && filter);
  StayingUser job("mirror job 'j'");
  auto exported = attach(user_a_, *n, kRead | kWrite, kAll & ~kResize);
  auto job_edge = attach(job, *n, 0, kAll & ~kResize);
  ASSERT_TRUE(exported && job_edge);

  ASSERT_TRUE(graph_.replace_node(**n, *filter));
  EXPECT_EQ((*exported)->node(), filter->get());
  EXPECT_EQ((*job_edge)->node(), n->get());
  EXPECT_EQ((*filter)->child("file")->node(), n->get());
  // The filter passes the export's permissions down to `n`.
  EXPECT_EQ((*filter)->child("file")->perm() & kWrite, kWrite);

  // And back: the export returns to `n`; the filter keeps its child.
  ASSERT_TRUE(graph_.replace_node(**filter, *n));
  EXPECT_EQ((*exported)->node(), n->get());
  EXPECT_TRUE((*filter)->parents().empty());
}

TEST_F(GraphTest, ReplaceNodeConflictChangesNothing) {
  auto a = add(null_co("a"));
  auto b = add(null_co("b"));
  auto parent = add({{"driver", "raw"}, {"node-name", "p"}, {"file", "a"}});
  ASSERT_TRUE(a && b && parent);
  auto writer = attach(user_a_, *parent, kRead | kWrite, kAll);
  auto exclusive = attach(user_b_, *b, kRead, kRead);  // unshares write on b
  ASSERT_TRUE(writer && exclusive);

  auto replaced = graph_.replace_node(**a, *b);
  ASSERT_FALSE(replaced);
  EXPECT_EQ(replaced.error().message(),
            "Permission conflict on node 'b': permissions 'write' are both required by node 'p' "
            "(uses node 'b' as 'file' child) and unshared by block device 'b' (uses node 'b' as "
            "'root' child).");
  EXPECT_EQ((*parent)->child("file")->node(), a->get());
  EXPECT_EQ((*a)->parents().size(), 1u);
  EXPECT_EQ((*b)->parents().size(), 1u);
  EXPECT_EQ((*parent)->child("file")->perm() & kWrite, kWrite);
}

// ---- activation ---------------------------------------------------------------------------------

TEST_F(GraphTest, InactiveChildOfActiveParentIsRefused) {
  auto x = add({{"driver", "null-co"}, {"node-name", "x"}, {"active", false}});
  ASSERT_TRUE(x) << error_of(x);
  auto y = add({{"driver", "raw"}, {"node-name", "y"}, {"file", "x"}});
  ASSERT_FALSE(y);
  EXPECT_EQ(y.error().message(), "Inactive 'x' can't be a file child of active 'y'");
  EXPECT_EQ(graph_.find("y"), nullptr);
  EXPECT_TRUE((*x)->parents().empty());

  auto inactive_y = add({{"driver", "raw"}, {"node-name", "y"}, {"file", "x"}, {"active", false}});
  EXPECT_TRUE(inactive_y) << error_of(inactive_y);
}

TEST_F(GraphTest, InactiveNodeOffersOnlyConsistentRead) {
  auto x = add({{"driver", "null-co"}, {"node-name", "x"}, {"active", false}});
  ASSERT_TRUE(x) << error_of(x);
  // QEMU names every permission asked for, consistent read included.
  auto writer = attach(user_a_, *x, kRead | kWrite, kAll);
  ASSERT_FALSE(writer);
  EXPECT_EQ(writer.error().message(),
            "Permission 'consistent read, write' unavailable on inactive node");
  auto resizer = attach(user_a_, *x, kResize, kAll);
  ASSERT_FALSE(resizer);
  EXPECT_EQ(resizer.error().message(), "Permission 'resize' unavailable on inactive node");
  auto blind_writer = attach(user_a_, *x, kWrite, kAll);
  ASSERT_FALSE(blind_writer);
  EXPECT_EQ(blind_writer.error().message(), "Permission 'write' unavailable on inactive node");
  EXPECT_TRUE((*x)->parents().empty());
  auto reader = attach(user_b_, *x, kRead, kAll);
  EXPECT_TRUE(reader) << error_of(reader);
}

TEST_F(GraphTest, InactivationRulesAndRecursion) {
  auto n = add(null_co("n"));
  auto r = add({{"driver", "raw"}, {"node-name", "r"}, {"file", "n"}});
  ASSERT_TRUE(n && r);

  auto child_first = graph_.set_active(n->get(), false);
  ASSERT_FALSE(child_first);
  EXPECT_EQ(child_first.error().message(), "Node has active parent node");
  EXPECT_TRUE((*n)->is_active());

  {
    auto writer = attach(user_a_, *r, kRead | kWrite, kAll);
    ASSERT_TRUE(writer) << error_of(writer);
    auto busy = graph_.set_active(r->get(), false);
    ASSERT_FALSE(busy);
    EXPECT_EQ(busy.error().message(), "Failed to inactivate node: Operation not permitted");
    EXPECT_TRUE((*r)->is_active());
    EXPECT_TRUE((*n)->is_active());
  }

  auto reader = attach(user_a_, *r, kRead, kAll);
  ASSERT_TRUE(reader) << error_of(reader);
  ASSERT_TRUE(graph_.set_active(r->get(), false));
  EXPECT_FALSE((*r)->is_active());
  EXPECT_FALSE((*n)->is_active());  // inactivation recurses into children
  // An inactive parent shares write and resize on its children.
  EXPECT_EQ((*r)->child("file")->shared(), kAll);
  EXPECT_TRUE(graph_.set_active(r->get(), false)) << "inactivating twice is harmless";
  EXPECT_TRUE(graph_.set_active(nullptr, false));

  ASSERT_TRUE(graph_.set_active(r->get(), true));
  EXPECT_TRUE((*n)->is_active());  // activation recurses into children first
  EXPECT_TRUE((*r)->is_active());
  EXPECT_TRUE(graph_.set_active(r->get(), true));
}

// ---- lock bytes ---------------------------------------------------------------------------------

class LockTest : public GraphTest {
 protected:
  void SetUp() override {
    GraphTest::SetUp();
    if (!ImageLock::ofd_supported()) {
      GTEST_SKIP() << "kernel without OFD locks: locks do not conflict inside one process";
    }
    path_ = dir_.file("img", 1 << 20);
    inode_ = inode_of(path_);
  }
  nlohmann::json raw_over_file(const std::string& name) const {
    return {{"driver", "raw"},
            {"node-name", name},
            {"file", {{"driver", "file"}, {"filename", path_}}}};
  }

  std::string path_;
  std::string inode_;
};

// Byte 100+i while permission i is taken, 200+i while it is not shared (file-posix.c).
TEST_F(LockTest, RootUserHoldsQemuLockBytes) {
  auto r = add(raw_over_file("r"));
  ASSERT_TRUE(r) << error_of(r);
  EXPECT_TRUE(locked_bytes(inode_).empty());
  {
    auto writer = attach(user_a_, *r, kRead | kWrite, kAll);
    ASSERT_TRUE(writer) << error_of(writer);
    EXPECT_EQ(locked_bytes(inode_), (std::vector<int>{100, 101}));
  }
  EXPECT_TRUE(locked_bytes(inode_).empty());
  {
    auto exclusive = attach(user_a_, *r, kRead, kRead | kUnchanged);
    ASSERT_TRUE(exclusive) << error_of(exclusive);
    EXPECT_EQ(locked_bytes(inode_), (std::vector<int>{100, 201, 203}));
  }
  EXPECT_TRUE(locked_bytes(inode_).empty());
}

// Observed with a writable NBD export on raw offset=512: locks 100-101 and 203.
TEST_F(LockTest, RawWindowUnsharesResize) {
  nlohmann::json options = raw_over_file("r");
  options["offset"] = 512;
  auto r = add(options);
  ASSERT_TRUE(r) << error_of(r);
  auto writer = attach(user_a_, *r, kRead | kWrite, kAll);
  ASSERT_TRUE(writer) << error_of(writer);
  EXPECT_EQ(locked_bytes(inode_), (std::vector<int>{100, 101, 203}));
}

// Two graphs on one file behave like two processes (OFD locks conflict between descriptions).
TEST_F(LockTest, TwoGraphsConflictLikeTwoProcesses) {
  Graph other;
  auto mine = add(raw_over_file("r"));
  ASSERT_TRUE(mine) << error_of(mine);
  auto theirs = open_node(other, raw_over_file("r"));
  ASSERT_TRUE(theirs) << error_of(theirs);
  {
    auto exclusive_reader = attach(user_a_, *mine, kRead, kAll & ~kWrite);
    ASSERT_TRUE(exclusive_reader) << error_of(exclusive_reader);
    auto writer = block::attach(other, user_b_, *theirs, kRead | kWrite, kAll);
    ASSERT_FALSE(writer);
    EXPECT_EQ(writer.error().message(), "Failed to get \"write\" lock");
    EXPECT_EQ(writer.error().kind(), ErrorKind::kPermission);
    EXPECT_EQ((*theirs)->child("file")->perm(), 0u);
    EXPECT_EQ(locked_bytes(inode_), (std::vector<int>{100, 201}));
  }
  auto writer = block::attach(other, user_b_, *theirs, kRead | kWrite, kAll);
  ASSERT_TRUE(writer) << error_of(writer);
  auto exclusive_reader = attach(user_a_, *mine, kRead, kAll & ~kWrite);
  ASSERT_FALSE(exclusive_reader);
  EXPECT_EQ(exclusive_reader.error().message(), "Failed to get shared \"write\" lock");
  EXPECT_EQ(locked_bytes(inode_), (std::vector<int>{100, 101}));
  // Sharing write, the same reader coexists with the writer.
  auto reader = attach(user_a_, *mine, kRead, kAll);
  ASSERT_TRUE(reader) << error_of(reader);
  EXPECT_EQ(locked_bytes(inode_), (std::vector<int>{100, 100, 101}));
}

// ---- node names and failed opens
// ------------------------------------------------------------------

TEST_F(GraphTest, NodeNamesAreChecked) {
  auto bad = add(null_co("1bad"));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message(), "Invalid node-name: '1bad'");
  auto slash = add(null_co("a/b"));
  ASSERT_FALSE(slash);
  EXPECT_EQ(slash.error().message(), "Invalid node-name: 'a/b'");
  auto too_long = add(null_co(std::string(32, 'a')));
  ASSERT_FALSE(too_long);
  EXPECT_EQ(too_long.error().message(), "Node name too long");
  auto longest = add(null_co(std::string(31, 'a')));
  EXPECT_TRUE(longest) << error_of(longest);

  auto n0 = add(null_co("n0"));
  ASSERT_TRUE(n0) << error_of(n0);
  auto again = add(null_co("n0"));
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().message(), "Duplicate nodes with node-name='n0'");
  auto inline_again = add({{"driver", "raw"}, {"node-name", "n1"}, {"file", null_co("n0")}});
  ASSERT_FALSE(inline_again);
  EXPECT_EQ(inline_again.error().message(), "Duplicate nodes with node-name='n0'");
  EXPECT_EQ(graph_.find("n1"), nullptr);
  EXPECT_EQ(graph_.nodes().size(), 2u);
  EXPECT_TRUE((*n0)->parents().empty());
}

TEST_F(GraphTest, InlineChildrenGetGeneratedNames) {
  auto r = add({{"driver", "raw"}, {"node-name", "r"}, {"file", {{"driver", "null-co"}}}});
  ASSERT_TRUE(r) << error_of(r);
  Node* child = (*r)->child("file")->node();
  EXPECT_TRUE(std::regex_match(child->name(), std::regex("#block[0-9]+"))) << child->name();
  EXPECT_EQ(graph_.find(child->name()), child);
  auto s = add({{"driver", "raw"}, {"node-name", "s"}, {"file", {{"driver", "null-co"}}}});
  ASSERT_TRUE(s) << error_of(s);
  EXPECT_NE((*s)->child("file")->node()->name(), child->name());
  // Newest first, as query-named-block-nodes lists them.
  std::vector<Node*> nodes = graph_.nodes();
  ASSERT_EQ(nodes.size(), 4u);
  EXPECT_EQ(nodes[0], s->get());
  EXPECT_EQ(nodes[3], child);
}

TEST_F(GraphTest, FailedOpenLeavesNothingBehind) {
  auto n = add(null_co("n"));
  ASSERT_TRUE(n) << error_of(n);
  auto window = add({{"driver", "raw"}, {"node-name", "r"}, {"file", "n"}, {"offset", 2 << 20}});
  ASSERT_FALSE(window);
  EXPECT_EQ(window.error().message(),
            "Offset (2097152) cannot be greater than size of the containing file (1048576)");
  EXPECT_EQ(graph_.find("r"), nullptr);
  EXPECT_TRUE((*n)->parents().empty());
  EXPECT_EQ(graph_.nodes(), std::vector<Node*>{n->get()});

  std::string path = dir_.file("img", 1 << 20);
  auto inline_file =
      add({{"driver", "raw"},
           {"node-name", "r"},
           {"size", 1000},
           {"file", {{"driver", "file"}, {"node-name", "kid"}, {"filename", path}}}});
  ASSERT_FALSE(inline_file);
  EXPECT_EQ(inline_file.error().message(), "Specified size is not multiple of 512");
  EXPECT_EQ(graph_.find("kid"), nullptr);
  EXPECT_EQ(graph_.find("r"), nullptr);
  EXPECT_EQ(graph_.nodes().size(), 1u);

  std::string missing = path + ".missing";
  auto no_file = add({{"driver", "raw"},
                      {"node-name", "r"},
                      {"file", {{"driver", "file"}, {"node-name", "kid"}, {"filename", missing}}}});
  ASSERT_FALSE(no_file);
  EXPECT_EQ(no_file.error().message(),
            "Could not open '" + missing + "': No such file or directory");
  EXPECT_EQ(graph_.nodes().size(), 1u);

  // The names are free again.
  auto reopened = add({{"driver", "raw"},
                       {"node-name", "r"},
                       {"file", {{"driver", "file"}, {"node-name", "kid"}, {"filename", path}}}});
  EXPECT_TRUE(reopened) << error_of(reopened);
}

}  // namespace
}  // namespace strata::block
