"""qcow2 overlap checks and the corrupt bit, on strata and qemu-storage-daemon.

A crafted image whose first L2 entry points (with OFLAG_COPIED, so the write goes in place) at
the active L1 table: a guest write to guest offset 0 over NBD must fail with EIO, emit
BLOCK_IMAGE_CORRUPTED with QEMU's fields, set the corrupt bit on disk and fail every later
request; the image then opens read-only but not read-write. Also: a dirty image left by a
lazy-refcounts writer that was killed is repaired by a read-write blockdev-add.
"""

import json
import os
import struct
import subprocess

import pytest

from conftest import need_tool
from helpers import delete_export_after_clients_left

MiB = 1 << 20
L1_OFFSET = 0x30000  # qemu-img create's layout for 64 KiB clusters


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def crafted_image(workdir):
    need_tool("qemu-img")
    need_tool("qemu-io")
    path = os.path.join(workdir, "c.qcow2")
    assert run("qemu-img", "create", "-f", "qcow2", path, "16M").returncode == 0
    assert run("qemu-io", "-c", "write -P 1 0 64k", path).returncode == 0
    with open(path, "r+b") as f:
        f.seek(L1_OFFSET)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | L1_OFFSET))
    return path


def incompatible_features(path):
    with open(path, "rb") as f:
        f.seek(72)
        return struct.unpack(">Q", f.read(8))[0]


def add_qcow2(q, path, **extra):
    return q.cmd("blockdev-add", driver="qcow2", node_name="q0",
                 file={"driver": "file", "filename": path}, **extra)


@pytest.mark.needs("nbd-server-start", "block-export-add")
def test_write_over_l1_marks_image_corrupt(daemon):
    need_tool("qemu-io")
    d = daemon()
    q = d.qmp
    path = crafted_image(daemon.workdir)
    assert add_qcow2(q, path) == {"return": {}}
    sock = daemon.workdir + "/nbd.sock"
    assert q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}) == \
        {"return": {}}
    assert q.cmd("block-export-add", type="nbd", id="e0", node_name="q0", writable=True) == \
        {"return": {}}
    uri = "nbd+unix:///q0?socket=" + sock
    first = run("qemu-io", "-f", "raw", "-c", "write -P 2 0 512", uri)
    assert "write failed: Input/output error" in first.stdout + first.stderr
    event = q.wait_event("BLOCK_IMAGE_CORRUPTED")
    assert event["data"] == {
        "device": "",
        "node-name": "q0",
        "msg": "Preventing invalid write on metadata (overlaps with active L1 table)",
        "offset": L1_OFFSET,
        "size": 512,
        "fatal": True,
    }
    assert incompatible_features(path) & 2 == 2
    # The node is unusable now: later requests fail too, and no second event is sent.
    second = run("qemu-io", "-f", "raw", "-c", "write -P 2 0 512", uri)
    assert "write failed" in second.stdout + second.stderr
    assert "Marking image as corrupt: Preventing invalid write on metadata (overlaps with " \
           "active L1 table); further corruption events will be suppressed" in d.stderr()
    assert delete_export_after_clients_left(q, "e0") == {"return": {}}
    q.wait_event("BLOCK_EXPORT_DELETED")
    assert q.cmd("blockdev-del", node_name="q0") == {"return": {}}
    # Read-write open refused with QEMU's text; read-only open works.
    reply = add_qcow2(q, path)
    assert reply["error"]["desc"] == "qcow2: Image is corrupt; cannot be opened read/write"
    assert add_qcow2(q, path, read_only=True) == {"return": {}}
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True


@pytest.mark.needs("nbd-server-start", "block-export-add")
@pytest.mark.parametrize("overlap_check", ["none", {"template": "all", "active-l1": False}])
def test_overlap_check_disabled_lets_the_write_through(daemon, overlap_check):
    need_tool("qemu-io")
    d = daemon()
    q = d.qmp
    path = crafted_image(daemon.workdir)
    assert add_qcow2(q, path, overlap_check=overlap_check) == {"return": {}}
    sock = daemon.workdir + "/nbd.sock"
    assert q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}) == \
        {"return": {}}
    assert q.cmd("block-export-add", type="nbd", id="e0", node_name="q0", writable=True) == \
        {"return": {}}
    written = run("qemu-io", "-f", "raw", "-c", "write -P 2 0 512",
                  "nbd+unix:///q0?socket=" + sock)
    assert written.returncode == 0 and "failed" not in written.stdout, written
    assert not [e for e in q.events if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
    assert incompatible_features(path) & 2 == 0


def test_dirty_image_repaired_on_read_write_open(daemon):
    need_tool("qemu-img")
    need_tool("qemu-io")
    d = daemon()
    q = d.qmp
    path = os.path.join(daemon.workdir, "d.qcow2")
    assert run("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", path,
               "16M").returncode == 0
    run("qemu-io", "-c", "write -P 0x5a 0 128k", "-c", "sigraise 9", path)
    assert incompatible_features(path) & 1 == 1
    # Read-only: left dirty.
    assert add_qcow2(q, path, read_only=True) == {"return": {}}
    assert q.cmd("blockdev-del", node_name="q0") == {"return": {}}
    assert incompatible_features(path) & 1 == 1
    # Read-write: repaired and clean.
    assert add_qcow2(q, path) == {"return": {}}
    assert incompatible_features(path) & 1 == 0
    assert q.cmd("blockdev-del", node_name="q0") == {"return": {}}
    assert run("qemu-img", "check", path).returncode == 0
    assert run("qemu-io", "-c", "read -P 0x5a 0 128k", path).returncode == 0


def test_corrupt_image_opens_read_only_only(daemon):
    d = daemon()
    q = d.qmp
    path = crafted_image(daemon.workdir)
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 2))
    reply = add_qcow2(q, path)
    assert reply["error"] == {
        "class": "GenericError",
        "desc": "qcow2: Image is corrupt; cannot be opened read/write",
    }
    assert add_qcow2(q, path, read_only=True) == {"return": {}}
    assert q.cmd("blockdev-del", node_name="q0") == {"return": {}}
    assert incompatible_features(path) == 2


def read_u64(f, offset):
    f.seek(offset)
    return struct.unpack(">Q", f.read(8))[0]


def bitmap_directory_offset(f):
    """The bitmap directory offset from the header's bitmaps extension (type 0x23852875)."""
    f.seek(100)
    offset = struct.unpack(">I", f.read(4))[0]  # header_length: extensions follow it
    while True:
        f.seek(offset)
        ext_type, ext_len = struct.unpack(">II", f.read(8))
        if ext_type == 0:
            raise AssertionError("no bitmaps extension")
        if ext_type == 0x23852875:
            return struct.unpack(">IIQQ", f.read(24))[3]
        offset += 8 + (ext_len + 7) // 8 * 8


# Where each metadata structure lives in a qemu-img image with a snapshot and a bitmap: the
# snapshot taken after a first write, a second write then gives the active layer its own L2.
STRUCTURES = {
    "refcount table": lambda f: read_u64(f, 48),
    "refcount block": lambda f: read_u64(f, read_u64(f, 48)) & 0x00FFFFFFFFFFFE00,
    "snapshot table": lambda f: read_u64(f, 64),
    "inactive L1 table": lambda f: read_u64(f, read_u64(f, 64)),
    "inactive L2 table": lambda f: read_u64(f, read_u64(f, read_u64(f, 64))) & 0x00FFFFFFFFFFFE00,
    "bitmap directory": bitmap_directory_offset,
}


def image_with_every_structure(workdir, target):
    """An image whose first active L2 entry (with OFLAG_COPIED) points at `target`'s cluster."""
    need_tool("qemu-img")
    need_tool("qemu-io")
    path = os.path.join(workdir, "m.qcow2")
    assert run("qemu-img", "create", "-f", "qcow2", path, "16M").returncode == 0
    assert run("qemu-io", "-c", "write -P 1 0 64k", path).returncode == 0
    assert run("qemu-img", "snapshot", "-c", "s1", path).returncode == 0
    assert run("qemu-io", "-c", "write -P 3 0 64k", path).returncode == 0
    assert run("qemu-img", "bitmap", "--add", path, "b0").returncode == 0
    with open(path, "r+b") as f:
        offset = STRUCTURES[target](f)
        active_l2 = read_u64(f, read_u64(f, 40)) & 0x00FFFFFFFFFFFE00
        assert offset != 0 and offset % 65536 == 0 and offset != active_l2
        f.seek(active_l2)
        f.write(struct.pack(">Q", (1 << 63) | offset))
    return path, offset


@pytest.mark.needs("nbd-server-start", "block-export-add")
@pytest.mark.parametrize("target", sorted(STRUCTURES))
def test_write_over_each_structure_marks_image_corrupt(daemon, target):
    """Every structure of the `all` template is guarded; `cached` (the default) leaves out only
    the inactive L2 tables, as in QEMU."""
    need_tool("qemu-io")
    d = daemon()
    q = d.qmp
    path, offset = image_with_every_structure(daemon.workdir, target)
    expect_corrupt = target != "inactive L2 table"
    for attempt, overlap_check in enumerate(["cached", "all"]):
        node = "q%d" % attempt
        assert q.cmd("blockdev-add", driver="qcow2", node_name=node, overlap_check=overlap_check,
                     file={"driver": "file", "filename": path}) == {"return": {}}
        sock = "%s/nbd%d.sock" % (daemon.workdir, attempt)
        assert q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}) == \
            {"return": {}}
        assert q.cmd("block-export-add", type="nbd", id="e0", node_name=node,
                     writable=True) == {"return": {}}
        written = run("qemu-io", "-f", "raw", "-c", "write -P 2 0 512",
                      "nbd+unix:///%s?socket=%s" % (node, sock))
        if expect_corrupt:
            assert "write failed: Input/output error" in written.stdout + written.stderr
            event = q.wait_event("BLOCK_IMAGE_CORRUPTED")
            assert event["data"] == {
                "device": "",
                "node-name": node,
                "msg": "Preventing invalid write on metadata (overlaps with %s)" % target,
                "offset": offset,
                "size": 512,
                "fatal": True,
            }
            assert incompatible_features(path) & 2 == 2
            return
        assert written.returncode == 0 and "failed" not in written.stdout, written
        assert not [e for e in q.events if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
        assert delete_export_after_clients_left(q, "e0") == {"return": {}}
        q.wait_event("BLOCK_EXPORT_DELETED")
        assert q.cmd("nbd-server-stop") == {"return": {}}
        assert q.cmd("blockdev-del", node_name=node) == {"return": {}}
        assert incompatible_features(path) & 2 == 0
        # Put the snapshot's L2 table back as it was (the write changed its first 512 bytes).
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\0" * 512)
        expect_corrupt = True
