"""Fleecing sessions (copy-before-write + snapshot-access, exported over NBD) started and torn
down again and again while a guest keeps writing, on strata and qemu-storage-daemon: every
round reads the point-in-time view back, and at the end nothing is left behind (no nodes, no
exports, no stuck requests; under AddressSanitizer no leaks when the daemon exits).

FLEECE_ROUNDS sets the number of rounds (default 20; `make test-long` runs 100).
"""

import os
import subprocess

from conftest import need_tool
from test_backup_jobs import add_qcow2, make_raw, make_source, qio

ROUNDS = int(os.environ.get("FLEECE_ROUNDS", "20"))


def test_fleecing_sessions_under_guest_writes(daemon):
    need_tool("qemu-io")
    d = daemon()
    q = d.qmp
    add_qcow2(q, "disk", make_source(d, "disk.qcow2"))
    sock = os.path.join(d.dir, "nbd.sock")
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    guest = "nbd+unix:///cbw?socket=%s" % sock
    fleece = "nbd+unix:///access?socket=%s" % sock
    for rnd in range(ROUNDS):
        temp = make_raw(d, "temp%d.raw" % rnd)
        q.ok("blockdev-add", {"driver": "raw", "node-name": "temp",
                              "file": {"driver": "file", "filename": temp}})
        q.ok("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                              "file": "disk", "target": "temp"})
        q.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "access",
                              "file": "cbw"})
        q.ok("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw",
                                  "writable": True})
        q.ok("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "access"})
        # The view at the start of the round: what the previous round's writes left.
        expect = 0x11 if rnd == 0 else 0x80 + (rnd - 1) % 64
        pattern = 0x80 + rnd % 64
        writer = subprocess.Popen(
            ["qemu-io", "-f", "raw"] +
            sum([["-c", "aio_write -P 0x%x %d 64k" % (pattern, off)]
                 for off in range(0, 1 << 20, 64 << 10)], []) + ["-c", "aio_flush", guest],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        qio("-f", "raw", "-r", "-c", "read -P 0x%x 0 1M" % expect, "-c",
            "read -P 0x22 1M 1M", fleece)
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "failed" not in out, out + err
        qio("-f", "raw", "-r", "-c", "read -P 0x%x 0 1M" % expect, fleece)
        # Tear down with the fleece client gone and the guest export dropped hard.
        q.ok("block-export-del", {"id": "fleece"})
        q.wait_event("BLOCK_EXPORT_DELETED")
        q.ok("block-export-del", {"id": "guest", "mode": "hard"})
        q.wait_event("BLOCK_EXPORT_DELETED")
        for node in ("access", "cbw", "temp"):
            q.ok("blockdev-del", {"node-name": node})
        os.unlink(temp)
    names = {n["node-name"] for n in q.ok("query-named-block-nodes")}
    assert not names & {"temp", "cbw", "access"}, names
    assert q.ok("query-block-exports") == []
    q.ok("nbd-server-stop")
    last = 0x80 + (ROUNDS - 1) % 64
    q.ok("blockdev-del", {"node-name": "disk"})
    qio("-f", "qcow2", "-c", "read -P 0x%x 0 1M" % last, "-c", "read -P 0x22 1M 1M",
        os.path.join(d.dir, "disk.qcow2"))
