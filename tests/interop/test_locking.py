"""Image locking interop with QEMU's tools (reliability.md section 3.3).

Lock bytes: 100+i = "I hold permission i", 200+i = "I do not share permission i"
(i: 0 consistent-read, 1 write, 2 write-unchanged, 3 resize), 1-byte F_RDLCK OFD locks.

Observed on QSD 10.0.2: nodes only lock what their *users* need.  A file+raw graph
created with blockdev-add has no user (no export, no qcow2 parent), takes no
permission and therefore holds no lock byte at all; qemu-io can then write the
image.  Conflicts need a permission-taking parent: an export, or qcow2 (which
always takes consistent-read|write|resize on its file child when writable).
"""

import os
import subprocess
import time

import pytest

from conftest import make_qcow2, make_raw, need_tool
from helpers import delete_export_after_clients_left, lock_bytes

MiB = 1 << 20
QCOW2_RW = {100, 101, 103, 201, 203}
WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'
HINT = "Is another process using the image [%s]?"


def generic(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def locks(pid, path):
    held, kinds = lock_bytes(pid, path)
    if held:
        assert kinds == {("OFDLCK", "READ")}, kinds
    return held


def qio(*args):
    need_tool("qemu-io")
    return subprocess.run(["qemu-io"] + list(args), capture_output=True, text=True, timeout=30)


def assert_qio_ok(r):
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stdout, r.stderr)


def assert_qio_lock_error(r, path, what):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr == "qemu-io: can't open device %s: %s\n%s\n" % (path, what, HINT % path), \
        r.stderr


class Holder:
    """An interactive qemu-io keeping an image open (stdin on a pipe)."""

    def __init__(self, *args, path, expect):
        need_tool("qemu-io")
        self.proc = subprocess.Popen(["qemu-io"] + list(args) + [path], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while locks(self.proc.pid, path) != expect:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, locks(self.proc.pid, path)
            time.sleep(0.02)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def holder():
    hs = []

    def start(*args, path, expect):
        h = Holder(*args, path=path, expect=expect)
        hs.append(h)
        return h
    yield start
    for h in hs:
        h.close()


def add_qcow2_or_skip(q, impl, args):
    r = q.cmd_args("blockdev-add", args)
    desc = r.get("error", {}).get("desc", "")
    if impl.name != "qsd" and desc == "Parameter 'driver' does not accept value 'qcow2'":
        pytest.skip("%s has no qcow2 driver yet" % impl.name)
    if impl.name != "qsd" and desc.startswith("qcow2 images can only be opened read-only"):
        pytest.skip("%s opens qcow2 read-only only: %s" % (impl.name, desc))
    return r


def test_raw_without_users_holds_no_locks(daemon):
    need_tool("qemu-io")
    d = daemon()
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert d.qmp.cmd("blockdev-add", driver="file", node_name="f0", filename=img) == \
        {"return": {}}
    assert d.qmp.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert locks(d.pid, img) == set()
    assert_qio_ok(qio("-f", "raw", "-c", "write -P 0x11 0 512", img))
    assert_qio_ok(qio("-f", "raw", "-r", "-c", "read -P 0x11 0 512", img))
    assert_qio_ok(qio("-f", "raw", "-r", "-U", "-c", "read -P 0x11 0 512", img))
    # inactive: still nothing
    assert d.qmp.cmd("blockdev-set-active", active=False) == {"return": {}}
    assert locks(d.pid, img) == set()
    assert d.qmp.cmd("blockdev-set-active", active=True) == {"return": {}}
    assert locks(d.pid, img) == set()


def test_holder_raw_rw_does_not_block_daemon(daemon, holder):
    """qemu-io with a raw image open R/W holds 100-101 and shares everything."""
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    holder("-f", "raw", path=img, expect={100, 101})
    d = daemon()
    assert d.qmp.cmd("blockdev-add", driver="raw", node_name="r0",
                     file={"driver": "file", "filename": img}) == {"return": {}}
    assert d.qmp.cmd("blockdev-add", driver="file", node_name="f1", filename=img,
                     locking="on") == {"return": {}}
    assert locks(d.pid, img) == set()


def test_holder_raw_ro_lock_bytes(daemon, holder):
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    holder("-f", "raw", "-r", path=img, expect={100})
    d = daemon()
    assert d.qmp.cmd("blockdev-add", driver="raw", node_name="r0",
                     file={"driver": "file", "filename": img}) == {"return": {}}


def test_force_share_and_locking_off_on_file(daemon):
    d = daemon()
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    q = d.qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img,
                 force_share=True) == \
        generic("force-share=on can only be used with read-only images")
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img,
                 force_share=True, read_only=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=img,
                 locking="off") == {"return": {}}
    assert q.cmd("blockdev-add", driver="file", node_name="f2", filename=img,
                 locking="auto") == {"return": {}}
    assert locks(d.pid, img) == set()


# -- with a permission-taking user: NBD export (beyond milestone 1) ------------

@pytest.mark.needs("nbd-server-start", "block-export-add", "block-export-del")
def test_raw_export_lock_bytes(daemon):
    d = daemon()
    q = d.qmp
    w = daemon.workdir
    img = make_raw(os.path.join(w, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="raw", node_name="r0",
                 file={"driver": "file", "filename": img}) == {"return": {}}
    assert q.cmd("nbd-server-start",
                 addr={"type": "unix", "data": {"path": w + "/nbd.sock"}}) == {"return": {}}
    assert q.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True) == \
        {"return": {}}
    # writable NBD export: holds read+write, shares everything but resize
    assert locks(d.pid, img) == {100, 101, 203}
    assert_qio_ok(qio("-f", "raw", "-c", "write 0 512", img))
    assert_qio_ok(qio("-f", "raw", "-r", "-c", "read 0 512", img))
    r = qio("-f", "raw", "-c", "truncate 4M", img)
    assert r.returncode == 1 and r.stderr == \
        'qemu-io: Failed to get "resize" lock\n' + HINT % img + "\n", r.stderr
    assert q.cmd("blockdev-set-active", node_name="r0", active=False) == \
        generic("Failed to inactivate node: Operation not permitted")
    assert q.cmd("blockdev-set-active", active=False) == \
        generic("Failed to inactivate all nodes: Operation not permitted")
    assert locks(d.pid, img) == {100, 101, 203}
    assert delete_export_after_clients_left(q, "e0") == {"return": {}}
    d.qmp.wait_event("BLOCK_EXPORT_DELETED")
    assert locks(d.pid, img) == set()
    assert q.cmd("block-export-add", type="nbd", id="e1", node_name="r0", writable=False) == \
        {"return": {}}
    assert locks(d.pid, img) == {100, 203}


# -- qcow2 (its file child always takes permissions) ----------------------------

def test_qcow2_lock_bytes_and_qemu_io(daemon):
    need_tool("qemu-img")
    d = daemon()
    q = d.qmp
    img = make_qcow2(os.path.join(daemon.workdir, "q.qcow2"), MiB)
    r = add_qcow2_or_skip(q, daemon.impl, {"driver": "qcow2", "node-name": "q0",
                                           "file": {"driver": "file", "filename": img}})
    assert r == {"return": {}}
    assert locks(d.pid, img) == QCOW2_RW
    assert_qio_lock_error(qio("-f", "qcow2", "-c", "write 0 512", img), img, WRITE_LOCK)
    assert_qio_lock_error(qio("-f", "qcow2", "-r", "-c", "read 0 512", img), img,
                          SHARED_WRITE_LOCK)
    assert_qio_lock_error(qio("-f", "raw", "-c", "write 0 512", img), img, WRITE_LOCK)
    assert_qio_ok(qio("-f", "qcow2", "-r", "-U", "-c", "read 0 512", img))
    # inactive: only byte 100 (consistent-read) remains, others may open R/W
    assert q.cmd("blockdev-set-active", node_name="q0", active=False) == {"return": {}}
    assert locks(d.pid, img) == {100}
    assert_qio_ok(qio("-f", "qcow2", "-r", "-c", "read 0 512", img))
    assert_qio_ok(qio("-f", "qcow2", "-c", "write 0 512", img))
    assert q.cmd("blockdev-set-active", node_name="q0", active=False) == {"return": {}}
    assert locks(d.pid, img) == {100}
    assert q.cmd("blockdev-set-active", node_name="q0", active=True) == {"return": {}}
    assert locks(d.pid, img) == QCOW2_RW
    assert q.cmd("blockdev-set-active", active=False) == {"return": {}}
    assert locks(d.pid, img) == {100}
    assert q.cmd("blockdev-set-active", active=True) == {"return": {}}
    assert locks(d.pid, img) == QCOW2_RW
    assert q.cmd("blockdev-del", node_name="q0") == {"return": {}}
    assert locks(d.pid, img) == set()


def test_qcow2_held_by_qemu_io(daemon, holder):
    need_tool("qemu-img")
    img = make_qcow2(os.path.join(daemon.workdir, "q.qcow2"), MiB)
    holder("-f", "qcow2", path=img, expect=QCOW2_RW)
    d = daemon()
    q = d.qmp
    r = add_qcow2_or_skip(q, daemon.impl, {"driver": "qcow2", "node-name": "q0",
                                           "file": {"driver": "file", "filename": img}})
    assert r == generic(WRITE_LOCK)
    assert q.cmd("blockdev-add", driver="qcow2", node_name="q0", read_only=True,
                 file={"driver": "file", "filename": img}) == generic(SHARED_WRITE_LOCK)
    # an existing file node is reused: its own (missing) force-share counts
    assert q.cmd("blockdev-add", driver="file", node_name="qf", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="qcow2", node_name="q0", file="qf", read_only=True,
                 force_share=True) == generic(SHARED_WRITE_LOCK)
    assert q.cmd("blockdev-add", driver="qcow2", node_name="q0", file="qf",
                 force_share=True) == \
        generic("force-share=on can only be used with read-only images")
    # inline file child inherits read-only + force-share
    assert q.cmd("blockdev-add", driver="qcow2", node_name="q1", read_only=True,
                 force_share=True, file={"driver": "file", "filename": img}) == {"return": {}}
    assert locks(d.pid, img) == {100}
    # locking=off: no lock taken, no conflict checked
    assert q.cmd("blockdev-add", driver="qcow2", node_name="q2",
                 file={"driver": "file", "filename": img, "locking": "off"}) == {"return": {}}
    assert locks(d.pid, img) == {100}
    assert [n["node-name"] for n in q.cmd("query-named-block-nodes")["return"]
            if not n["node-name"].startswith("#")] == ["q2", "q1", "qf"]


# -- blkdebug: take-child-perms / unshare-child-perms on the image edge ---------------------

def add_blkdebug(q, img, **perms):
    args = {"driver": "blkdebug", "node-name": "b0",
            "image": {"driver": "file", "node-name": "f0", "filename": img}}
    args.update({k.replace("_", "-"): v for k, v in perms.items()})
    return q.cmd_args("blockdev-add", args)


def test_blkdebug_child_perms_lock_bytes(daemon):
    """Taking write locks only byte 101 (qemu-io shares write, so it may still write); unsharing
    write locks 201, which keeps qemu-io writers out but not readers."""
    d = daemon()
    q = d.qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert add_blkdebug(q, img, take_child_perms=["write"]) == {"return": {}}
    assert locks(d.pid, img) == {101}
    assert_qio_ok(qio("-f", "raw", "-c", "write 0 512", img))
    assert_qio_ok(qio("-f", "raw", "-r", "-c", "read 0 512", img))
    assert q.cmd("blockdev-del", node_name="b0") == {"return": {}}
    assert locks(d.pid, img) == set()

    assert add_blkdebug(q, img, take_child_perms=["write"],
                        unshare_child_perms=["write"]) == {"return": {}}
    assert locks(d.pid, img) == {101, 201}
    assert_qio_lock_error(qio("-f", "raw", "-c", "write 0 512", img), img, WRITE_LOCK)
    assert_qio_ok(qio("-f", "raw", "-r", "-c", "read 0 512", img))
    assert_qio_ok(qio("-f", "raw", "-r", "-U", "-c", "read 0 512", img))
    assert q.cmd("blockdev-del", node_name="b0") == {"return": {}}

    assert add_blkdebug(q, img, unshare_child_perms=["write"]) == {"return": {}}
    assert locks(d.pid, img) == {201}
    assert_qio_lock_error(qio("-f", "raw", "-c", "write 0 512", img), img, WRITE_LOCK)
    assert_qio_ok(qio("-f", "raw", "-r", "-c", "read 0 512", img))
    assert q.cmd("blockdev-del", node_name="b0") == {"return": {}}

    assert add_blkdebug(q, img, take_child_perms=["consistent-read", "write", "resize"]) == \
        {"return": {}}
    assert locks(d.pid, img) == {100, 101, 103}
    assert q.cmd("blockdev-del", node_name="b0") == {"return": {}}
    assert locks(d.pid, img) == set()


def test_holder_rw_vs_blkdebug_child_perms(daemon, holder):
    """qemu-io holding the image R/W (bytes 100-101) shares everything: taking write works,
    unsharing what it holds does not."""
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    holder("-f", "raw", path=img, expect={100, 101})
    d = daemon()
    q = d.qmp
    assert add_blkdebug(q, img, take_child_perms=["write"]) == {"return": {}}
    assert locks(d.pid, img) == {101}
    assert q.cmd("blockdev-del", node_name="b0") == {"return": {}}
    assert add_blkdebug(q, img, unshare_child_perms=["write"]) == generic(SHARED_WRITE_LOCK)
    assert add_blkdebug(q, img, take_child_perms=["write"], unshare_child_perms=["write"]) == \
        generic(SHARED_WRITE_LOCK)
    assert add_blkdebug(q, img, unshare_child_perms=["consistent-read"]) == \
        generic('Failed to get shared "consistent read" lock')
    # over an existing file node: the node stays, nothing is locked
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=img) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b1", image="f1",
                 unshare_child_perms=["write"]) == generic(SHARED_WRITE_LOCK)
    assert [n["node-name"] for n in q.cmd("query-named-block-nodes")["return"]] == ["f1"]
    assert locks(d.pid, img) == set()


def test_force_share_overrides_unshare_against_holder(daemon, holder):
    """A force-share node shares every permission with everyone: unsharing write on top of it
    neither locks byte 201 nor conflicts with a qemu-io writer (QEMU's bdrv_child_perm)."""
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    holder("-f", "raw", path=img, expect={100, 101})
    d = daemon()
    q = d.qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img, read_only=True,
                 force_share=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b0", image="f0", read_only=True,
                 unshare_child_perms=["write"],
                 take_child_perms=["consistent-read"]) == {"return": {}}
    assert locks(d.pid, img) == {100}
    # without force-share the same graph conflicts with the writer
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=img,
                 read_only=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b1", image="f1", read_only=True,
                 unshare_child_perms=["write"]) == generic(SHARED_WRITE_LOCK)
