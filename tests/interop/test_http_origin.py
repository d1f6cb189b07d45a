"""The http driver on strata and qemu-storage-daemon (QEMU's block/curl.c): a read-only node on an
HTTP origin (lighttpd on 127.0.0.1), its option checks and error texts, and a local qcow2
overlay whose backing file is an http URL, streamed in while the guest writes through an NBD
export. An origin stopped mid-stream fails the job, not the image, and a second stream after the
origin is back completes it.
"""

import os
import subprocess
import time

import pytest

from helpers import delete_export_after_clients_left
from http_origin import HttpOrigin
from test_backup_jobs import collect_until, compare, img, qio, run_cmd, start_nbd
from test_stream import check_clean

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def origin(workdir):
    root = os.path.join(workdir, "www")
    os.makedirs(root)
    with open(os.path.join(root, "base.raw"), "wb") as f:
        for i in range(SIZE // MiB):
            f.write(bytes([0x50 + i]) * MiB)
    o = HttpOrigin(root, workdir)
    yield o
    o.stop()


def base_path(origin):
    return os.path.join(origin.root, "base.raw")


def test_http_node_reads_the_origin(daemon, origin):
    d = daemon()
    q = d.qmp
    url = origin.url("base.raw")
    q.ok("blockdev-add", {"driver": "http", "node-name": "web", "url": url, "read-only": True})
    node = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}["web"]
    assert (node["drv"], node["file"], node["ro"], node["image"]["virtual-size"]) == (
        "http", url, True, SIZE), node
    sock = os.path.join(d.dir, "nbd.sock")
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    q.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "web"})
    uri = "nbd+unix:///web?socket=%s" % sock
    qio("-r", "-f", "raw", "-c", "read -P 0x52 2M 1M", "-c", "read -P 0x57 7M 4k",
        "-c", "read -P 0x50 0 512", uri)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, base_path(origin)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("options,desc", [
    ({}, "curl driver does not support writes"),
    ({"read-only": True, "url": "nope.raw"},
     "CURL: Error opening file: The requested URL returned error: 404"),
    ({"read-only": True, "timeout": 100001}, "timeout parameter is too large or negative"),
    ({"read-only": True, "timeout": -1}, "timeout parameter is too large or negative"),
    ({"read-only": True, "readahead": 1000}, "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512"),
    ({"read-only": True, "driver": "https"},
     "https curl driver cannot handle the URL '%(url)s' (does not start with 'https://')"),
    ({"read-only": True, "url": "ftp://x/y"},
     "http curl driver cannot handle the URL 'ftp://x/y' (does not start with 'http://')"),
    ({"read-only": True, "sslverify": False}, "Parameter 'sslverify' is unexpected"),
    ({"read-only": True, "password-secret": "nope"}, "No secret with id 'nope'"),
])
def test_option_errors(daemon, origin, options, desc):
    d = daemon()
    url = origin.url("base.raw")
    args = dict({"driver": "http", "node-name": "web", "url": url}, **options)
    if args["url"] == "nope.raw":
        args["url"] = origin.url("nope.raw")
    r = d.qmp.cmd_args("blockdev-add", args)
    assert r == {"error": {"class": "GenericError", "desc": desc % {"url": url}}}, r


def test_auto_read_only_opens_read_only(daemon, origin):
    d = daemon()
    d.qmp.ok("blockdev-add", {"driver": "http", "node-name": "web", "auto-read-only": True,
                              "url": origin.url("base.raw")})
    assert {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}["web"]["ro"]


def make_overlay(d, origin):
    path = os.path.join(d.dir, "overlay.qcow2")
    img("create", "-q", "-f", "qcow2", "-b", origin.url("base.raw"), "-F", "raw", path, str(SIZE))
    return path


def stream_events(q, args, timeout=60):
    r, before = run_cmd(q, "block-stream", args)
    assert r == {"return": {}}, r
    events = before + collect_until(q, "null", timeout=timeout)
    return [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]


def test_stream_an_http_backing_file_under_guest_writes(daemon, origin):
    d = daemon()
    q = d.qmp
    overlay = make_overlay(d, origin)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": overlay}})
    node = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}["top"]
    assert node["backing_file"] == origin.url("base.raw"), node
    uri = start_nbd(d, "top")
    r, before = run_cmd(q, "block-stream", {"job-id": "s0", "device": "top", "speed": 4 * MiB})
    assert r == {"return": {}}, r
    qio("-f", "raw", "-c", "write -P 0x99 6M 512k", "-c", "read -P 0x50 0 1M", uri)
    q.ok("block-job-set-speed", {"device": "s0", "speed": 0})
    events = before + collect_until(q, "null", timeout=60)
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" not in completed[0], events
    assert "return" in delete_export_after_clients_left(q, "exp-top")
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(overlay)
    expected = os.path.join(d.dir, "expected.raw")
    subprocess.run(["cp", base_path(origin), expected], check=True)
    qio("-f", "raw", "-c", "write -P 0x99 6M 512k", expected)
    r = compare(overlay, expected)
    assert r.returncode == 0, r.stdout + r.stderr
    info = subprocess.run(["qemu-img", "info", "--output=json", overlay], capture_output=True,
                          text=True, timeout=60)
    assert "backing-filename" not in info.stdout, info.stdout


def test_origin_stopped_mid_stream_fails_the_job_and_a_new_stream_completes(daemon, origin):
    d = daemon()
    q = d.qmp
    overlay = make_overlay(d, origin)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": overlay}})
    r, _ = run_cmd(q, "block-stream", {"job-id": "s0", "device": "top", "speed": 1 * MiB})
    assert r == {"return": {}}, r
    time.sleep(0.5)
    origin.stop()
    events = collect_until(q, "null", timeout=60)
    completed = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert len(completed) == 1 and "error" in completed[0], events
    q.ok("blockdev-del", {"node-name": "top"})
    origin.start()  # (qemu-img check opens the backing file too)
    check_clean(overlay)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": overlay}})
    completed = stream_events(q, {"job-id": "s1", "device": "top"})
    assert len(completed) == 1 and "error" not in completed[0], completed
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(overlay)
    r = compare(overlay, base_path(origin))
    assert r.returncode == 0, r.stdout + r.stderr


def test_strata_img_reads_an_overlay_with_an_http_backing_file(daemon, origin):
    # (the image tool: qemu-img and strata img read the same chain)
    if daemon.impl.name != "strata":
        pytest.skip("a strata img check")
    d = daemon()
    overlay = make_overlay(d, origin)
    qio("-f", "qcow2", "-c", "write -P 0x77 1M 64k", overlay)
    strata = os.environ.get("STRATA_BIN") or os.path.join(
        os.path.dirname(__file__), "..", "..", "build", "strata")
    expected = os.path.join(d.dir, "expected.raw")
    subprocess.run(["cp", base_path(origin), expected], check=True)
    qio("-f", "raw", "-c", "write -P 0x77 1M 64k", expected)
    r = subprocess.run([strata, "img", "compare", overlay, expected], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "Images are identical.\n", r.stdout + r.stderr
