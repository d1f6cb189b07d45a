"""Streaming from a slow remote origin on strata and qemu-storage-daemon: a local qcow2 overlay
whose backing file is an NBD export served by nbdkit with its delay filter. The guest writes
through an export of the overlay while block-stream copies the origin in; the overlay ends up
with everything and no backing file. An origin that goes away mid-stream fails the job (not the
image), and a second stream after the origin is back completes it.
"""

import os
import subprocess
import time

import pytest

from conftest import need_tool
from helpers import delete_export_after_clients_left
from test_backup_jobs import collect_until, compare, img, qio, run_cmd, start_nbd
from test_stream import check_clean

MiB = 1 << 20
SIZE = 8 * MiB


class Origin:
    """nbdkit serving `image` read-only on a unix socket, each read delayed by `rdelay`."""

    def __init__(self, image, sock, rdelay="5ms"):
        need_tool("nbdkit")
        self.sock = sock
        self.argv = ["nbdkit", "-f", "-r", "-U", sock, "--filter=delay", "file",
                     "file=%s" % image, "rdelay=%s" % rdelay]
        self.proc = None
        self.start()

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def origin_image(workdir):
    path = os.path.join(workdir, "origin.raw")
    with open(path, "wb") as f:
        for i in range(SIZE // MiB):
            f.write(bytes([0x40 + i]) * MiB)
    return path


@pytest.fixture
def origin(workdir, origin_image):
    o = Origin(origin_image, os.path.join(workdir, "origin.sock"))
    yield o
    o.stop()


def add_overlay(d, origin_sock, overlay):
    q = d.qmp
    q.ok("blockdev-add", {"driver": "nbd", "node-name": "origin", "read-only": True,
                          "server": {"type": "unix", "path": origin_sock}})
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "origin",
                          "file": {"driver": "file", "filename": overlay}})


def new_overlay(d):
    path = os.path.join(d.dir, "overlay.qcow2")
    img("create", "-q", "-f", "qcow2", path, str(SIZE))
    return path


def test_stream_from_a_slow_nbd_origin_under_guest_writes(daemon, origin, origin_image):
    d = daemon()
    q = d.qmp
    overlay = new_overlay(d)
    add_overlay(d, origin.sock, overlay)
    uri = start_nbd(d, "top")
    r, before = run_cmd(q, "block-stream", {"job-id": "s0", "device": "top"})
    assert r == {"return": {}}, r
    qio("-f", "raw", "-c", "write -P 0x99 6M 512k", "-c", "read -P 0x40 0 1M", uri)
    events = before + collect_until(q, "null", timeout=60)
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" not in completed[0], events
    assert "return" in delete_export_after_clients_left(q, "exp-top")
    q.ok("blockdev-del", {"node-name": "top"})
    q.ok("blockdev-del", {"node-name": "origin"})
    check_clean(overlay)
    expected = os.path.join(d.dir, "expected.raw")
    subprocess.run(["cp", origin_image, expected], check=True)
    qio("-f", "raw", "-c", "write -P 0x99 6M 512k", expected)
    r = compare(overlay, expected)
    assert r.returncode == 0, r.stdout + r.stderr
    info = subprocess.run(["qemu-img", "info", "--output=json", overlay], capture_output=True,
                          text=True, timeout=60)
    assert "backing-filename" not in info.stdout, info.stdout


def test_origin_gone_mid_stream_fails_the_job_and_a_new_stream_completes(daemon, origin,
                                                                         origin_image):
    d = daemon()
    q = d.qmp
    overlay = new_overlay(d)
    add_overlay(d, origin.sock, overlay)
    r, _ = run_cmd(q, "block-stream", {"job-id": "s0", "device": "top", "speed": 1 * MiB})
    assert r == {"return": {}}, r
    time.sleep(0.5)
    origin.stop()
    events = collect_until(q, "null", timeout=60)
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" in completed[0], events
    # The overlay keeps its backing link and passes qemu-img check.
    nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file_depth"] >= 1, nodes["top"]
    q.ok("blockdev-del", {"node-name": "top"})
    q.ok("blockdev-del", {"node-name": "origin"})
    check_clean(overlay)
    # The origin is back: stream again from where the overlay is.
    origin.start()
    add_overlay(d, origin.sock, overlay)
    r, before = run_cmd(q, "block-stream", {"job-id": "s1", "device": "top"})
    assert r == {"return": {}}, r
    events = before + collect_until(q, "null", timeout=60)
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" not in completed[0], events
    q.ok("blockdev-del", {"node-name": "top"})
    q.ok("blockdev-del", {"node-name": "origin"})
    check_clean(overlay)
    r = compare(overlay, origin_image)
    assert r.returncode == 0, r.stdout + r.stderr
