"""blockdev-add of qcow2 with the BlockdevOptionsQcow2 options, strata and qemu-storage-daemon
side by side: the same reply (error class and text, or success) and, when the node opens, the
same query-named-block-nodes entry."""

import os
import subprocess

import pytest

from conftest import Daemon, _resolve_impl, need_tool
from helpers import norm

MiB = 1 << 20


@pytest.fixture
def pair(workdir):
    started = []

    def start():
        for index, name in enumerate(("strata", "qsd")):
            d = Daemon(_resolve_impl(name), workdir, index, [])
            started.append(d)
            d.connect()
            d.negotiate()
        return started

    start.workdir = workdir
    yield start
    problems = []
    for d in reversed(started):
        problems.extend(d.stop())
    if problems:
        pytest.fail("daemon teardown:\n" + "\n".join(problems), pytrace=False)


def qemu_img(*args, cwd):
    need_tool("qemu-img")
    r = subprocess.run(["qemu-img"] + list(args), cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


OPTION_SETS = [
    {"lazy-refcounts": True},
    {"lazy-refcounts": False},
    {"pass-discard-request": False, "pass-discard-snapshot": False, "pass-discard-other": True},
    {"discard-no-unref": True},
    {"overlap-check": "none"},
    {"overlap-check": "all"},
    {"overlap-check": "bogus"},
    {"overlap-check": 3},
    {"overlap-check": {"template": "constant", "main-header": False, "active-l2": True}},
    {"overlap-check": {"template": "cached", "inactive-l2": True, "bitmap-directory": False}},
    {"overlap-check": {"template": "sometimes"}},
    {"overlap-check": {"nosuch": True}},
    {"cache-size": MiB},
    {"cache-size": 65536},
    {"cache-size": MiB, "l2-cache-size": 262144},
    {"cache-size": MiB, "refcount-cache-size": 262144},
    {"cache-size": MiB, "l2-cache-size": 262144, "refcount-cache-size": 262144},
    {"cache-size": 262144, "l2-cache-size": MiB},
    {"cache-size": 262144, "refcount-cache-size": MiB},
    {"l2-cache-size": 32 * MiB},
    {"l2-cache-size": 4096, "l2-cache-entry-size": 4096},
    {"l2-cache-entry-size": 4096},
    {"l2-cache-entry-size": 1000},
    {"l2-cache-entry-size": 256},
    {"l2-cache-entry-size": 131072},
    {"refcount-cache-size": 4096},
    {"cache-clean-interval": 0},
    {"cache-clean-interval": 600},
    {"cache-clean-interval": -1},
    {"cache-clean-interval": 1 << 32},
    {"encrypt": {"format": "luks", "key-secret": "sec0"}},
    {"encrypt": {"format": "aes"}},
    {"encrypt": {"format": "nosuch"}},
    {"data-file": "nonode"},
    {"data-file": {"driver": "file", "filename": "img.data"}},
    {"data-file": {"driver": "file", "filename": "nosuch.data"}},
]


def run_option_sets(pair, image_args, option_sets):
    daemons = pair()
    results = []
    for d in daemons:
        qemu_img("create", "-q", "-f", "qcow2", *image_args, "img.qcow2", "4M", cwd=d.dir)
        # an existing file for the inline data-file case: it opens, then the image refuses it
        open(os.path.join(d.dir, "img.data"), "wb").close()
        q = d.qmp
        q.cmd_args("blockdev-add", {"driver": "file", "node-name": "f",
                                    "filename": os.path.join(d.dir, "img.qcow2")})
        seen = []
        for options in option_sets:
            args = {"driver": "qcow2", "node-name": "disk", "file": "f"}
            args.update(options)
            if isinstance(options.get("data-file"), dict):
                args["data-file"] = dict(options["data-file"], filename=os.path.join(
                    d.dir, options["data-file"]["filename"]))
            r = q.cmd_args("blockdev-add", args)
            entry = {"options": options, "reply": norm(r, d.dir)}
            if "return" in r:
                nodes = q.cmd_args("query-named-block-nodes", {"flat": True})["return"]
                entry["node"] = [norm(n, d.dir) for n in nodes if n["node-name"] == "disk"]
                assert q.cmd_args("blockdev-del", {"node-name": "disk"}) == {"return": {}}
            seen.append(entry)
        results.append(seen)
    strata, qsd = results
    problems = ["%s: strata %s, qsd %s" % (s["options"], s, q) for s, q in zip(strata, qsd)
                if s != q]
    assert not problems, "\n".join(problems)


def test_qcow2_options_same_as_qsd(pair):
    run_option_sets(pair, [], OPTION_SETS)


def test_qcow2_v2_options_same_as_qsd(pair):
    run_option_sets(pair, ["-o", "compat=0.10"], [
        {"lazy-refcounts": True},
        {"discard-no-unref": True},
        {"cache-size": MiB},
    ])


def test_qcow2_small_cluster_options_same_as_qsd(pair):
    run_option_sets(pair, ["-o", "cluster_size=4096"], [
        {"l2-cache-entry-size": 4096},
        {"l2-cache-entry-size": 8192},
        {"l2-cache-entry-size": 512, "l2-cache-size": 4096},
        {"cache-size": 16384},
    ])


def test_qcow2_encrypted_image_refused_as_qsd(pair):
    """Neither daemon has the secret: both refuse a LUKS image with QEMU's messages."""
    run_option_sets(pair, ["--object", "secret,id=sec0,data=123", "-o",
                           "encrypt.format=luks,encrypt.key-secret=sec0"], [
        {},
        {"read-only": True},
        {"encrypt": {"format": "luks"}},
        {"encrypt": {"format": "luks", "key-secret": "sec0"}},
        {"encrypt": {"format": "aes", "key-secret": "sec0"}},
    ])
