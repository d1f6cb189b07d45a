"""Dirty bitmaps over QMP: block-dirty-bitmap-*, x-debug-block-dirty-bitmap-sha256, the
`dirty-bitmaps` member of query-named-block-nodes and `transaction` with bitmap actions.

Every scenario runs on strata and on qemu-storage-daemon 10.0.2 with the same expectations
(error texts observed on QSD). Bitmap contents are checked through the sha256 QEMU defines
(the bitmap's 64-bit little-endian words), computed here from the chunks the test dirtied.
"""

import hashlib
import os
import struct

import pytest

from conftest import need_tool, run_tool

MiB = 1 << 20


def expected_sha256(size, granularity, dirty_chunks):
    """QEMU's hbitmap_sha256: the last HBitmap level, at least one 64-bit word."""
    bits = max((size + granularity - 1) // granularity, 1)
    words = [0] * max((bits + 63) // 64, 1)
    for chunk in dirty_chunks:
        words[chunk // 64] |= 1 << (chunk % 64)
    return hashlib.sha256(b"".join(struct.pack("<Q", w) for w in words)).hexdigest()


def bitmaps_of(q, node):
    for info in q.ok("query-named-block-nodes", {"flat": True}):
        if info["node-name"] == node:
            return info.get("dirty-bitmaps")
    raise AssertionError("node %s not listed" % node)


def sha(q, node, name):
    return q.ok("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})["sha256"]


def error_of(q, command, args):
    return q.err(command, args)["desc"]


def start_with_nodes(daemon, size=4 * MiB):
    """A daemon with qcow2 node 'q0' (64 KiB clusters) and raw node 'r0' over a 1 MiB file."""
    d = daemon()
    qcow2 = os.path.join(d.dir, "a.qcow2")
    result = run_tool("qemu-img", "create", "-q", "-f", "qcow2", qcow2, str(size))
    assert result.returncode == 0, result.stderr
    raw = os.path.join(d.dir, "r.raw")
    with open(raw, "wb") as f:
        f.truncate(MiB)
    d.qmp.ok("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                              "file": {"driver": "file", "filename": qcow2}})
    d.qmp.ok("blockdev-add", {"driver": "raw", "node-name": "r0",
                              "file": {"driver": "file", "filename": raw, "node-name": "rf"}})
    return d, qcow2


def nbd_write(sock, export, *commands):
    """Writes through the daemon's NBD export with qemu-io (each command one -c)."""
    args = []
    for c in commands:
        args += ["-c", c]
    uri = "nbd+unix:///%s?socket=%s" % (export, sock)
    result = run_tool("qemu-io", "-f", "raw", *args, uri)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), \
        result.stdout + result.stderr


def start_nbd(q, d, node="q0", export="disk", **extra):
    sock = os.path.join(d.dir, "nbd.sock")
    if not os.path.exists(sock):
        q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    args = {"type": "nbd", "id": export, "name": export, "node-name": node, "writable": True}
    args.update(extra)
    q.ok("block-export-add", args)
    return sock


def test_add_errors_and_defaults(daemon):
    need_tool("qemu-img")
    d, _ = start_with_nodes(daemon)
    q = d.qmp
    add = "block-dirty-bitmap-add"
    assert error_of(q, add, {"node": "q0", "name": ""}) == "Bitmap name cannot be empty"
    assert error_of(q, add, {"node": "nope", "name": "b"}) == \
        "Cannot find device='nope' nor node-name='nope'"
    for bad in (0, 100, 513, 3 << 16):
        assert error_of(q, add, {"node": "q0", "name": "b", "granularity": bad}) == \
            "Granularity must be power of 2 and at least 512"
    assert error_of(q, add, {"node": "q0", "name": "b", "granularity": 1 << 32}) == \
        "Parameter 'granularity' expects uint32_t"
    assert error_of(q, add, {"node": "r0", "name": "p", "persistent": True}) == \
        "Can't store persistent bitmaps to r0: Operation not supported"
    q.ok(add, {"node": "q0", "name": "b"})
    assert error_of(q, add, {"node": "q0", "name": "b"}) == "Bitmap already exists: b"
    long_name = "x" * 1024
    assert error_of(q, add, {"node": "q0", "name": long_name}) == \
        "Bitmap name too long: " + long_name
    q.ok(add, {"node": "q0", "name": "x" * 1023})
    q.ok(add, {"node": "q0", "name": "p", "persistent": True, "disabled": True,
               "granularity": 4096})
    q.ok(add, {"node": "r0", "name": "def"})
    q.ok(add, {"node": "rf", "name": "def"})
    q.ok(add, {"node": "q0", "name": "big", "granularity": 1 << 31})
    assert bitmaps_of(q, "q0") == [
        {"name": "big", "recording": True, "persistent": False, "busy": False,
         "granularity": 1 << 31, "count": 0},
        {"name": "p", "recording": False, "persistent": True, "busy": False,
         "granularity": 4096, "count": 0},
        {"name": "x" * 1023, "recording": True, "persistent": False, "busy": False,
         "granularity": 65536, "count": 0},
        {"name": "b", "recording": True, "persistent": False, "busy": False,
         "granularity": 65536, "count": 0}]
    assert bitmaps_of(q, "r0")[0]["granularity"] == 65536
    assert bitmaps_of(q, "rf")[0]["granularity"] == 65536
    # A node without bitmaps has no dirty-bitmaps member at all.
    q.ok("block-dirty-bitmap-remove", {"node": "rf", "name": "def"})
    assert bitmaps_of(q, "rf") is None
    assert sha(q, "q0", "big") == expected_sha256(4 * MiB, 1 << 31, [])
    assert sha(q, "q0", "b") == expected_sha256(4 * MiB, 65536, [])


def test_lookup_errors(daemon):
    need_tool("qemu-img")
    d, _ = start_with_nodes(daemon)
    q = d.qmp
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b"})
    for command in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
                    "x-debug-block-dirty-bitmap-sha256"):
        assert error_of(q, command, {"node": "q0", "name": "zz"}) == \
            "Dirty bitmap 'zz' not found"
        assert error_of(q, command, {"node": "zz", "name": "b"}) == "Node 'zz' not found"
        assert error_of(q, command, {"node": "q0"}) == "Parameter 'name' is missing"
    merge = "block-dirty-bitmap-merge"
    assert error_of(q, merge, {"node": "q0", "target": "zz", "bitmaps": ["b"]}) == \
        "Dirty bitmap 'zz' not found"
    assert error_of(q, merge, {"node": "q0", "target": "b", "bitmaps": ["b", "nn"]}) == \
        "Dirty bitmap 'nn' not found"
    assert error_of(q, merge, {"node": "q0", "target": "b",
                               "bitmaps": [{"node": "nn", "name": "def"}]}) == \
        "Node 'nn' not found"
    q.ok("block-dirty-bitmap-add", {"node": "r0", "name": "def"})
    assert error_of(q, merge, {"node": "q0", "target": "b",
                               "bitmaps": ["b", {"node": "r0", "name": "def"}]}) == \
        "Bitmaps are of different sizes (destination size is 4194304, source size is " \
        "1048576) and can't be merged"


def test_writes_mark_enabled_bitmaps_merge_clear(daemon):
    need_tool("qemu-img")
    need_tool("qemu-io")
    d, _ = start_with_nodes(daemon)
    q = d.qmp
    add = "block-dirty-bitmap-add"
    q.ok(add, {"node": "q0", "name": "a"})                      # 64 KiB chunks
    q.ok(add, {"node": "q0", "name": "fine", "granularity": 512})
    q.ok(add, {"node": "q0", "name": "off", "disabled": True})
    sock = start_nbd(q, d)
    nbd_write(sock, "disk", "write -P 1 0 4k", "write -P 2 1M 64k",
              "write -z 3M 512", "discard 2M 4k")
    # discard=ignore (the default) makes the discard a no-op that marks nothing.
    a_chunks = [0, 16, 48]
    assert sha(q, "q0", "a") == expected_sha256(4 * MiB, 65536, a_chunks)
    fine_chunks = list(range(0, 8)) + list(range(2048, 2048 + 128)) + [6144]
    assert sha(q, "q0", "fine") == expected_sha256(4 * MiB, 512, fine_chunks)
    assert sha(q, "q0", "off") == expected_sha256(4 * MiB, 65536, [])
    listed = {b["name"]: b for b in bitmaps_of(q, "q0")}
    assert listed["a"]["count"] == len(a_chunks) * 65536
    assert listed["fine"]["count"] == len(fine_chunks) * 512
    assert listed["off"]["count"] == 0 and listed["off"]["recording"] is False

    # Merge a fine bitmap into a coarse one: every chunk overlapping a dirty bit.
    q.ok("block-dirty-bitmap-merge", {"node": "q0", "target": "off",
                                      "bitmaps": ["fine", {"node": "q0", "name": "a"}]})
    assert sha(q, "q0", "off") == expected_sha256(4 * MiB, 65536, a_chunks)
    # Clear, disable, enable.
    q.ok("block-dirty-bitmap-clear", {"node": "q0", "name": "a"})
    q.ok("block-dirty-bitmap-disable", {"node": "q0", "name": "a"})
    q.ok("block-dirty-bitmap-disable", {"node": "q0", "name": "a"})
    nbd_write(sock, "disk", "write -P 3 64k 4k")
    assert sha(q, "q0", "a") == expected_sha256(4 * MiB, 65536, [])
    q.ok("block-dirty-bitmap-enable", {"node": "q0", "name": "a"})
    nbd_write(sock, "disk", "write -P 3 128k 4k")
    assert sha(q, "q0", "a") == expected_sha256(4 * MiB, 65536, [2])
    assert {b["name"]: b["recording"] for b in bitmaps_of(q, "q0")}["a"] is True
    q.ok("block-dirty-bitmap-remove", {"node": "q0", "name": "fine"})
    assert [b["name"] for b in bitmaps_of(q, "q0")] == ["off", "a"]


def test_transaction_all_or_nothing(daemon):
    need_tool("qemu-img")
    need_tool("qemu-io")
    d, _ = start_with_nodes(daemon)
    q = d.qmp
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "base"})
    sock = start_nbd(q, d)
    nbd_write(sock, "disk", "write -P 1 0 64k")
    full = expected_sha256(4 * MiB, 65536, [0])

    def action(kind, **data):
        return {"type": kind, "data": data}

    def transaction(*actions, mode=None):
        args = {"actions": list(actions)}
        if mode:
            args["properties"] = {"completion-mode": mode}
        return q.cmd_args("transaction", args)

    # A failing action rolls back every action before it.
    r = transaction(action("block-dirty-bitmap-add", node="q0", name="t1"),
                    action("block-dirty-bitmap-clear", node="q0", name="base"),
                    action("block-dirty-bitmap-disable", node="q0", name="base"),
                    action("block-dirty-bitmap-merge", node="q0", target="base",
                           bitmaps=["base"]),
                    action("abort"))
    assert r == {"error": {"class": "GenericError",
                           "desc": "Transaction aborted using Abort action"}}, r
    assert [b["name"] for b in bitmaps_of(q, "q0")] == ["base"]
    assert sha(q, "q0", "base") == full
    assert bitmaps_of(q, "q0")[0]["recording"] is True
    r = transaction(action("block-dirty-bitmap-add", node="q0", name="t1"),
                    action("block-dirty-bitmap-add", node="q0", name="t1"))
    assert r["error"]["desc"] == "Bitmap already exists: t1", r
    assert [b["name"] for b in bitmaps_of(q, "q0")] == ["base"]

    # Argument errors fail the command before any action runs.
    r = transaction(action("block-dirty-bitmap-add", node="q0", name="t1"),
                    {"type": "bogus", "data": {}})
    assert r["error"]["desc"] == "Parameter 'type' does not accept value 'bogus'", r
    r = transaction({"type": "abort"})
    assert r["error"]["desc"] == "Parameter 'actions[0].data' is missing", r
    assert [b["name"] for b in bitmaps_of(q, "q0")] == ["base"]

    # completion-mode=grouped is for job actions only.
    r = transaction(action("block-dirty-bitmap-add", node="q0", name="t1"),
                    mode="grouped")
    assert r == {"error": {"class": "GenericError", "desc":
                           "Action 'block-dirty-bitmap-add' does not support transaction "
                           "property completion-mode = grouped"}}, r
    assert transaction() == {"return": {}}
    assert q.cmd_args("transaction", {"actions": [], "properties":
                                      {"completion-mode": "grouped"}}) == {"return": {}}

    # The usual incremental-backup rotation: freeze the old bitmap, start a new one.
    r = transaction(action("block-dirty-bitmap-add", node="q0", name="next"),
                    action("block-dirty-bitmap-disable", node="q0", name="base"),
                    action("block-dirty-bitmap-add", node="q0", name="tmp"),
                    action("block-dirty-bitmap-merge", node="q0", target="tmp",
                           bitmaps=["base"]),
                    action("block-dirty-bitmap-remove", node="q0", name="tmp"))
    assert r == {"return": {}}, r
    nbd_write(sock, "disk", "write -P 2 1M 4k")
    assert [(b["name"], b["recording"]) for b in bitmaps_of(q, "q0")] == \
        [("next", True), ("base", False)]
    assert sha(q, "q0", "base") == full
    assert sha(q, "q0", "next") == expected_sha256(4 * MiB, 65536, [16])


def _set_in_use(path, name):
    """Marks bitmap `name` IN_USE in the qcow2 directory, as a crash while open would."""
    with open(path, "r+b") as f:
        header = f.read(65536)
        pos = struct.unpack(">I", header[100:104])[0]
        while True:
            kind, length = struct.unpack(">II", header[pos:pos + 8])
            assert kind != 0, "no bitmaps extension"
            if kind == 0x23852875:
                count, _, _, directory = struct.unpack(">IIQQ", header[pos + 8:pos + 32])
                break
            pos += 8 + ((length + 7) & ~7)
        offset = directory
        for _ in range(count):
            f.seek(offset)
            entry = f.read(24)
            _, _, flags, _, _, name_size, extra = struct.unpack(">QIIBBHI", entry)
            f.seek(offset + 24 + extra)
            if f.read(name_size).decode() == name:
                f.seek(offset + 12)
                f.write(struct.pack(">I", flags | 1))
                return
            offset += (24 + extra + name_size + 7) & ~7
    raise AssertionError("bitmap %s not in the directory" % name)


def test_inconsistent_and_readonly_bitmaps(daemon, workdir):
    need_tool("qemu-img")
    broken = os.path.join(workdir, "broken.qcow2")
    ro = os.path.join(workdir, "ro.qcow2")
    for args in (["create", "-q", "-f", "qcow2", broken, "4M"],
                 ["bitmap", "--add", broken, "incons"],
                 ["create", "-q", "-f", "qcow2", ro, "4M"],
                 ["bitmap", "--add", ro, "rob"]):
        result = run_tool("qemu-img", *args)
        assert result.returncode == 0, result.stderr
    _set_in_use(broken, "incons")
    q = daemon().qmp
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                          "file": {"driver": "file", "filename": broken}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                          "file": {"driver": "file", "filename": ro}})
    assert bitmaps_of(q, "q0") == [{"name": "incons", "recording": False, "persistent": True,
                                    "busy": False, "granularity": 65536, "count": 0,
                                    "inconsistent": True}]
    inconsistent = "Bitmap 'incons' is inconsistent and cannot be used"
    readonly = "Bitmap 'rob' is readonly and cannot be modified"
    for command in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                    "block-dirty-bitmap-disable"):
        assert error_of(q, command, {"node": "q0", "name": "incons"}) == inconsistent
    assert error_of(q, "block-dirty-bitmap-clear", {"node": "ro", "name": "rob"}) == readonly
    q.ok("block-dirty-bitmap-disable", {"node": "ro", "name": "rob"})
    q.ok("block-dirty-bitmap-enable", {"node": "ro", "name": "rob"})
    assert error_of(q, "block-dirty-bitmap-remove", {"node": "ro", "name": "rob"}) == readonly
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "t"})
    merge = "block-dirty-bitmap-merge"
    assert error_of(q, merge, {"node": "q0", "target": "t", "bitmaps": ["incons"]}) == \
        inconsistent
    assert error_of(q, merge, {"node": "q0", "target": "incons", "bitmaps": ["t"]}) == \
        inconsistent
    assert error_of(q, merge, {"node": "ro", "target": "rob",
                               "bitmaps": [{"node": "q0", "name": "t"}]}) == readonly
    assert error_of(q, "block-dirty-bitmap-add",
                    {"node": "q0", "name": "incons"}) == "Bitmap already exists: incons"
    # Removal is the one thing an inconsistent bitmap allows, and it leaves the image.
    q.ok("block-dirty-bitmap-remove", {"node": "q0", "name": "incons"})
    assert bitmaps_of(q, "q0")[0]["name"] == "t"
    info = run_tool("qemu-img", "info", "-U", "--output=json", broken)
    assert "bitmaps" not in info.stdout, info.stdout


# ---- persistence -------------------------------------------------------------------------------

def start_peer(daemon, name, index):
    """A daemon of implementation `name` (strata or qsd) beside the test's own, stopped by the
    caller; skips when that implementation is not available."""
    import conftest
    peer = conftest.Daemon(conftest._resolve_impl(name), daemon.workdir, 100 + index, [])
    peer.connect()
    peer.negotiate()
    return peer


def open_qcow2(q, path, node="q0", read_only=False):
    args = {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": path}}
    if read_only:
        args["read-only"] = True
    q.ok("blockdev-add", args)


def image_bitmaps(path):
    import json
    result = run_tool("qemu-img", "info", "-U", "--output=json", path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["format-specific"]["data"]
    return {b["name"]: (b["granularity"], b["flags"]) for b in data.get("bitmaps", [])}


def test_persistent_bitmaps_survive_restart_and_cross_open(daemon):
    need_tool("qemu-img")
    need_tool("qemu-io")
    d, path = start_with_nodes(daemon)
    q = d.qmp
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "p", "persistent": True,
                                    "granularity": 4096})
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "frozen", "persistent": True})
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "tmp"})
    sock = start_nbd(q, d)
    nbd_write(sock, "disk", "write -P 1 0 4k", "write -P 2 1M 64k")
    q.ok("block-dirty-bitmap-disable", {"node": "q0", "name": "frozen"})
    nbd_write(sock, "disk", "write -P 3 3M 4k")
    p_chunks = [0] + list(range(256, 272)) + [768]
    frozen_chunks = [0, 16]
    assert sha(q, "q0", "p") == expected_sha256(4 * MiB, 4096, p_chunks)
    assert sha(q, "q0", "frozen") == expected_sha256(4 * MiB, 65536, frozen_chunks)
    # A new persistent bitmap reaches the image when the node closes.
    assert "p" not in image_bitmaps(path)
    q.ok("block-export-del", {"id": "disk"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    q.ok("blockdev-del", {"node-name": "q0"})
    assert image_bitmaps(path) == {"p": (4096, ["auto"]), "frozen": (65536, [])}
    check = run_tool("qemu-img", "check", path)
    assert check.returncode == 0, check.stdout + check.stderr

    # Reopened (the same daemon, then each implementation in turn): the same bits, flags and
    # recording state; in use on disk while open read-write.
    def verify(qmp):
        open_qcow2(qmp, path)
        assert image_bitmaps(path) == {"p": (4096, ["in-use", "auto"]),
                                       "frozen": (65536, ["in-use"])}
        listed = {b["name"]: b for b in bitmaps_of(qmp, "q0")}
        assert sorted(listed) == ["frozen", "p"]
        assert listed["p"]["recording"] is True and listed["p"]["persistent"] is True
        assert listed["frozen"]["recording"] is False
        assert listed["p"]["count"] == len(p_chunks) * 4096
        assert sha(qmp, "q0", "p") == expected_sha256(4 * MiB, 4096, p_chunks)
        assert sha(qmp, "q0", "frozen") == expected_sha256(4 * MiB, 65536, frozen_chunks)
        qmp.ok("blockdev-del", {"node-name": "q0"})
        assert image_bitmaps(path) == {"p": (4096, ["auto"]), "frozen": (65536, [])}

    verify(q)
    for index, name in enumerate(("strata", "qsd")):
        peer = start_peer(daemon, name, index)
        try:
            verify(peer.qmp)
        finally:
            problems = peer.stop()
        assert not problems, problems
    check = run_tool("qemu-img", "check", path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_persistent_bitmap_stored_at_quit_and_removed_from_image(daemon):
    need_tool("qemu-img")
    need_tool("qemu-io")
    d, path = start_with_nodes(daemon)
    q = d.qmp
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "p", "persistent": True})
    sock = start_nbd(q, d)
    nbd_write(sock, "disk", "write -P 1 2M 4k")
    problems = d.stop()
    assert not problems, problems
    assert image_bitmaps(path) == {"p": (65536, ["auto"])}
    d2 = daemon()
    open_qcow2(d2.qmp, path)
    assert sha(d2.qmp, "q0", "p") == expected_sha256(4 * MiB, 65536, [32])
    # Removing a persistent bitmap takes it out of the image at once.
    d2.qmp.ok("block-dirty-bitmap-remove", {"node": "q0", "name": "p"})
    assert image_bitmaps(path) == {}
    d2.qmp.ok("blockdev-del", {"node-name": "q0"})
    assert image_bitmaps(path) == {}
    check = run_tool("qemu-img", "check", path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_persistent_bitmap_on_read_only_node_is_lost_with_a_message(daemon, workdir):
    need_tool("qemu-img")
    path = os.path.join(workdir, "ro.qcow2")
    result = run_tool("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    assert result.returncode == 0, result.stderr
    d = daemon()
    open_qcow2(d.qmp, path, read_only=True)
    d.qmp.ok("block-dirty-bitmap-add", {"node": "q0", "name": "p", "persistent": True})
    d.qmp.ok("blockdev-del", {"node-name": "q0"})
    assert "Lost persistent bitmaps during inactivation of node 'q0': No write access" in \
        d.stderr()
    assert image_bitmaps(path) == {}


# ---- NBD qemu:dirty-bitmap contexts ------------------------------------------------------------

def nbdinfo_map(sock, export, context):
    need_tool("nbdinfo")
    result = run_tool("nbdinfo", "--map=" + context,
                      "nbd+unix:///%s?socket=%s" % (export, sock))
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.splitlines()]


def qemu_img_map(sock, export, bitmap):
    import json
    result = run_tool("qemu-img", "map", "--output=json", "--image-opts",
                      "driver=nbd,server.type=unix,server.path=%s,export=%s,"
                      "x-dirty-bitmap=qemu:dirty-bitmap:%s" % (sock, export, bitmap))
    assert result.returncode == 0, result.stderr
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(result.stdout)]


def test_nbd_export_bitmaps(daemon):
    need_tool("qemu-img")
    need_tool("qemu-io")
    d, _ = start_with_nodes(daemon)
    q = d.qmp
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b"})
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "fine", "granularity": 512})
    q.ok("block-dirty-bitmap-add", {"node": "r0", "name": "other", "disabled": True})
    sock = start_nbd(q, d, bitmaps=["b", {"node": "q0", "name": "fine"}])
    nbd_write(sock, "disk", "write -P 1 0 4k", "write -P 2 1040k 1k", "write -P 3 4095k 1k")

    listed = {b["name"]: b for b in bitmaps_of(q, "q0")}
    assert listed["b"]["busy"] is True and listed["fine"]["busy"] is True
    busy = "Bitmap 'b' is currently in use by another operation and cannot be used"
    for command in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
        assert error_of(q, command, {"node": "q0", "name": "b"}) == busy
    q.ok("block-dirty-bitmap-add", {"node": "q0", "name": "t"})
    assert error_of(q, "block-dirty-bitmap-merge",
                    {"node": "q0", "target": "b", "bitmaps": ["t"]}) == busy
    assert error_of(q, "block-dirty-bitmap-merge",
                    {"node": "q0", "target": "t", "bitmaps": ["b"]}) == busy
    assert sha(q, "q0", "b") == expected_sha256(4 * MiB, 65536, [0, 16, 63])

    assert nbdinfo_map(sock, "disk", "qemu:dirty-bitmap:b") == [
        ["0", "65536", "1", "dirty"],
        ["65536", "983040", "0", "clean"],
        ["1048576", "65536", "1", "dirty"],
        ["1114112", "3014656", "0", "clean"],
        ["4128768", "65536", "1", "dirty"]]
    assert nbdinfo_map(sock, "disk", "qemu:dirty-bitmap:fine") == [
        ["0", "4096", "1", "dirty"],
        ["4096", "1060864", "0", "clean"],
        ["1064960", "1024", "1", "dirty"],
        ["1065984", "3127296", "0", "clean"],
        ["4193280", "1024", "1", "dirty"]]
    # qemu-img's x-dirty-bitmap reads the context as base:allocation (dirty = "hole").
    assert qemu_img_map(sock, "disk", "b") == [
        (0, 65536, False, False),
        (65536, 983040, True, False),
        (1048576, 65536, False, False),
        (1114112, 3014656, True, False),
        (4128768, 65536, False, False)]

    # Export refusals, in QEMU's order and words.
    def refused(**extra):
        args = {"type": "nbd", "id": "x", "node-name": "q0", "name": "x"}
        args.update(extra)
        return error_of(q, "block-export-add", args)

    assert refused(bitmaps=["nope"]) == "Bitmap 'nope' is not found"
    assert refused(bitmaps=[{"node": "r0", "name": "nope"}]) == "Dirty bitmap 'nope' not found"
    assert refused(bitmaps=[{"node": "nn", "name": "nope"}]) == "Node 'nn' not found"
    assert refused(bitmaps=["b"]) == "Enabled bitmap 'b' incompatible with readonly export"
    assert refused(bitmaps=["b"], writable=True) == busy
    assert refused(bitmaps=[{"node": "q0", "name": "b"}]) == busy
    assert refused(bitmaps=["t"]) == "Enabled bitmap 't' incompatible with readonly export"
    # A bitmap of another node by {node, name}, and a disabled one on a read-only export.
    q.ok("block-export-add", {"type": "nbd", "id": "x", "node-name": "r0", "name": "x",
                              "bitmaps": [{"node": "r0", "name": "other"}]})
    assert {b["name"]: b["busy"] for b in bitmaps_of(q, "r0")} == {"other": True}
    assert nbdinfo_map(sock, "x", "qemu:dirty-bitmap:other") == [
        ["0", "1048576", "0", "clean"]]

    # Deleting the export frees its bitmaps.
    q.ok("block-export-del", {"id": "disk"})
    q.wait_event("BLOCK_EXPORT_DELETED")
    listed = {b["name"]: b for b in bitmaps_of(q, "q0")}
    assert listed["b"]["busy"] is False and listed["fine"]["busy"] is False
    q.ok("block-dirty-bitmap-remove", {"node": "q0", "name": "b"})
