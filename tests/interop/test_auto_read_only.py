"""auto-read-only on the file driver, verified on QSD 10.0.2.

auto-read-only=true is dynamic: the fd is opened O_RDONLY, the node reports
"ro": false, and the fd is reopened R/W only when a writer attaches (which then
fails on an unwritable file with the open(2) error).

Tests run as root, so an unwritable file is made with `chattr +i` (EPERM:
"Operation not permitted") or, failing that, a read-only bind mount (EROFS:
"Read-only file system").
"""

import os
import subprocess

import pytest

from conftest import make_raw

MiB = 1 << 20


def generic(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


@pytest.fixture
def unwritable(workdir):
    """(path, strerror) of a 1 MiB raw file that root cannot open for writing."""
    src = make_raw(os.path.join(workdir, "ro.raw"), MiB)
    r = subprocess.run(["chattr", "+i", src], capture_output=True)
    if r.returncode == 0:
        try:
            fd = os.open(src, os.O_RDWR)
            os.close(fd)
        except PermissionError:
            yield src, "Operation not permitted"
            subprocess.run(["chattr", "-i", src], capture_output=True)
            return
        subprocess.run(["chattr", "-i", src], capture_output=True)
    mnt = os.path.join(workdir, "rom")
    os.mkdir(mnt)
    ok = subprocess.run(["mount", "--bind", workdir, mnt], capture_output=True).returncode == 0
    if ok:
        ok = subprocess.run(["mount", "-o", "remount,bind,ro", mnt],
                            capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", mnt], capture_output=True)
    if not ok:
        pytest.skip("cannot make an unwritable file: neither chattr +i nor a read-only bind "
                    "mount works here")
    try:
        yield os.path.join(mnt, "ro.raw"), "Read-only file system"
    finally:
        subprocess.run(["umount", mnt], capture_output=True)


def fd_modes(pid, path):
    """O_ACCMODE of every fd of PID that refers to PATH."""
    modes = []
    real = os.path.realpath(path)
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) != real:
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                for line in f:
                    if line.startswith("flags:"):
                        modes.append(int(line.split()[1], 8) & 3)
        except OSError:
            continue
    return modes


def ro_map(q):
    return {n["node-name"]: n["ro"] for n in q.cmd("query-named-block-nodes")["return"]}


def test_auto_read_only_on_writable_file(daemon):
    d = daemon()
    q = d.qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img,
                 auto_read_only=True, read_only=False) == {"return": {}}
    assert ro_map(q) == {"f0": False}
    # opened read-only until a writer attaches
    assert fd_modes(d.pid, img) == [os.O_RDONLY]
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert ro_map(q) == {"r0": False, "f0": False}
    # explicit read-only wins
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=img,
                 auto_read_only=True, read_only=True) == {"return": {}}
    assert ro_map(q)["f1"] is True
    # reopen without auto-read-only: a real R/W fd
    assert q.cmd("blockdev-reopen", options=[
        {"driver": "file", "node-name": "f1", "filename": img}]) == {"return": {}}
    assert ro_map(q)["f1"] is False
    assert sorted(fd_modes(d.pid, img)) == [os.O_RDONLY, os.O_RDWR]


def test_auto_read_only_on_unwritable_file(daemon, unwritable):
    path, strerror = unwritable
    d = daemon()
    q = d.qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 auto_read_only=True, read_only=False) == {"return": {}}
    # still reported writable
    assert ro_map(q) == {"f0": False}
    assert fd_modes(d.pid, path) == [os.O_RDONLY]
    # a parent with no users does not need write access
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    # inline child inherits auto-read-only from the parent
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", auto_read_only=True,
                 file={"driver": "file", "filename": path}) == {"return": {}}
    assert {k: v for k, v in ro_map(q).items() if not k.startswith("#")} == \
        {"r1": False, "r0": False, "f0": False}
    # forcing R/W (auto-read-only reverts to false on reopen) fails and changes nothing
    assert q.cmd("blockdev-reopen", options=[
        {"driver": "file", "node-name": "f0", "filename": path}]) == \
        generic("Could not open '%s': %s" % (path, strerror))
    assert q.cmd("blockdev-reopen", options=[
        {"driver": "file", "node-name": "f0", "filename": path, "auto-read-only": True}]) == \
        {"return": {}}
    assert ro_map(q)["f0"] is False


def test_read_only_without_auto_on_unwritable_file(daemon, unwritable):
    path, strerror = unwritable
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 read_only=True) == {"return": {}}
    assert ro_map(q) == {"f0": True}
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file="f0") == {"return": {}}
    assert ro_map(q) == {"r0": False, "f0": True}
    err = generic("Could not open '%s': %s" % (path, strerror))
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=path,
                 read_only=False) == err
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=path) == err
    assert q.cmd("blockdev-add", driver="raw", node_name="r1",
                 file={"driver": "file", "filename": path}) == err
    assert q.cmd("blockdev-reopen", options=[
        {"driver": "file", "node-name": "f0", "filename": path}]) == err
    assert ro_map(q) == {"r0": False, "f0": True}


@pytest.mark.needs("block_resize")
def test_writer_on_auto_read_only_unwritable_file(daemon, unwritable):
    path, strerror = unwritable
    q = daemon().qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 auto_read_only=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="file", node_name="f1", filename=path,
                 read_only=True) == {"return": {}}
    # a resize needs write access: the dynamic upgrade fails with the open(2) error
    assert q.cmd("block_resize", node_name="f0", size=2 * MiB) == \
        generic("Could not open '%s': %s" % (path, strerror))
    assert q.cmd("block_resize", node_name="f1", size=2 * MiB) == \
        generic("Image is read-only")
    assert ro_map(q) == {"f1": True, "f0": False}


@pytest.mark.needs("nbd-server-start", "block-export-add")
def test_writable_export_on_auto_read_only_unwritable_file(daemon, unwritable):
    path, strerror = unwritable
    q = daemon().qmp
    w = daemon.workdir
    assert q.cmd("blockdev-add", driver="raw", node_name="r0", file={
        "driver": "file", "filename": path, "auto-read-only": True}) == {"return": {}}
    assert q.cmd("blockdev-add", driver="raw", node_name="r1", file={
        "driver": "file", "filename": path, "read-only": True}) == {"return": {}}
    assert q.cmd("nbd-server-start",
                 addr={"type": "unix", "data": {"path": w + "/nbd.sock"}}) == {"return": {}}
    assert q.cmd("block-export-add", type="nbd", id="e0", node_name="r0", writable=True) == \
        generic("Could not open '%s': %s" % (path, strerror))
    assert q.cmd("block-export-add", type="nbd", id="e1", node_name="r1", writable=True) == \
        generic("Block node is read-only")
    assert q.cmd("block-export-add", type="nbd", id="e2", node_name="r0", writable=False) == \
        {"return": {}}


def test_blkdebug_take_write_reopens_auto_read_only_file(daemon):
    """A writer permission taken by blkdebug upgrades the fd; dropping it downgrades again."""
    d = daemon()
    q = d.qmp
    img = make_raw(os.path.join(daemon.workdir, "a.raw"), MiB)
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=img,
                 auto_read_only=True) == {"return": {}}
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b0", image="f0") == {"return": {}}
    assert fd_modes(d.pid, img) == [os.O_RDONLY]
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b1", image="f0",
                 take_child_perms=["write"]) == {"return": {}}
    assert fd_modes(d.pid, img) == [os.O_RDWR]
    assert ro_map(q) == {"b1": False, "b0": False, "f0": False}
    assert q.cmd("blockdev-del", node_name="b1") == {"return": {}}
    assert fd_modes(d.pid, img) == [os.O_RDONLY]
    # resize alone also needs a writable fd
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b2", image="f0",
                 take_child_perms=["resize"]) == {"return": {}}
    assert fd_modes(d.pid, img) == [os.O_RDWR]


def test_blkdebug_take_write_on_unwritable_auto_read_only_file(daemon, unwritable):
    path, strerror = unwritable
    d = daemon()
    q = d.qmp
    assert q.cmd("blockdev-add", driver="file", node_name="f0", filename=path,
                 auto_read_only=True) == {"return": {}}
    err = generic("Could not open '%s': %s" % (path, strerror))
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b0", image="f0",
                 take_child_perms=["write"]) == err
    # inline: the child inherits auto-read-only from blkdebug
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b1", auto_read_only=True,
                 take_child_perms=["write"], image={"driver": "file", "filename": path}) == err
    assert ro_map(q) == {"f0": False}
    assert fd_modes(d.pid, path) == [os.O_RDONLY]
    # without the extra permission it attaches fine
    assert q.cmd("blockdev-add", driver="blkdebug", node_name="b2", image="f0") == \
        {"return": {}}
