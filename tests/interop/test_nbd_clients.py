"""Real NBD clients against strata's exports, differential against qemu-storage-daemon.

Each differential scenario starts the same exports on strata and on QSD and compares what the
clients print (nbdinfo --json/--list/--map, qemu-img map/compare) after normalising the socket
paths. The data-path scenarios (qemu-io, qemu-img convert, nbdcopy, fio, parallel clients) run
once per implementation and check the bytes.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import Daemon, _resolve_impl, need_tool, run_tool

SIZE = 64 << 20


def build_images(d):
    """A raw image with data at 1 MiB and 8 MiB, and a qcow2 overlay over a qcow2 base."""
    raw = os.path.join(d, "data.raw")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(b"\x11" * 65536)
        f.seek(8 << 20)
        f.write(b"\x22" * (1 << 20))
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    for args in (["create", "-q", "-f", "qcow2", base, str(SIZE)],
                 ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]):
        r = run_tool("qemu-img", *args)
        assert r.returncode == 0, r.stderr
    for img, cmd in ((base, "write -P 0x33 0 2M"), (top, "write -P 0x44 1M 2M"),
                     (top, "write -z 16M 1M")):
        r = run_tool("qemu-io", "-f", "qcow2", "-c", cmd, img)
        assert r.returncode == 0, r.stderr
    return raw, top


def export_args(d, sock):
    raw, top = build_images(d)
    return ["--blockdev", "driver=file,filename=%s,node-name=rawfile" % raw,
            "--blockdev", "driver=raw,file=rawfile,node-name=raw",
            "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=%s" % top,
            "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
            "--export", "nbd,id=e0,node-name=raw,name=raw,writable=on,description=raw disk",
            "--export", "nbd,id=e1,node-name=top,name=top,allocation-depth=on"]


class Pair:
    """The same exports on strata and QSD: `.dirs[impl]`, `.socks[impl]`."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.daemons = {}
        self.socks = {}
        self.dirs = {}

    def start(self, impl):
        d = os.path.join(self.tmp, impl.name)
        os.makedirs(d)
        sock = os.path.join(d, "nbd.sock")
        daemon = Daemon(impl, d, 0, export_args(d, sock))
        daemon.connect()
        daemon.negotiate()
        self.daemons[impl.name] = daemon
        self.socks[impl.name] = sock
        self.dirs[impl.name] = d

    def uri(self, name, export):
        return "nbd+unix:///%s?socket=%s" % (export, self.socks[name])

    def stop(self):
        problems = []
        for daemon in self.daemons.values():
            problems.extend(daemon.stop())
        return problems


@pytest.fixture
def pair():
    impls = [_resolve_impl("strata"), _resolve_impl("qsd")]
    tmp = tempfile.mkdtemp(prefix="nbd-", dir="/tmp")
    p = Pair(tmp)
    try:
        for impl in impls:
            p.start(impl)
        yield p
    finally:
        problems = p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        pytest.fail("daemon teardown:\n" + "\n".join(problems), pytrace=False)


def same_output(pair, tool, *args_with_uri):
    """Runs `tool args` against both daemons (URI placeholders {raw}, {top}, {list}) and returns
    the normalised outputs (strata, qsd)."""
    outs = []
    for name in ("strata", "qsd"):
        args = [a.format(raw=pair.uri(name, "raw"), top=pair.uri(name, "top"),
                         list=pair.uri(name, "")) for a in args_with_uri]
        r = run_tool(tool, *args, timeout=60)
        assert r.returncode == 0, (name, r.stderr)
        outs.append(r.stdout.replace(pair.socks[name], "SOCK"))
    return outs


def test_nbdinfo_json(pair):
    need_tool("nbdinfo")
    for uri in ("{raw}", "{top}"):
        strata, qsd = same_output(pair, "nbdinfo", "--json", uri)
        assert json.loads(strata) == json.loads(qsd)


def test_nbdinfo_list(pair):
    need_tool("nbdinfo")
    strata, qsd = same_output(pair, "nbdinfo", "--list", "--json", "{list}")
    assert json.loads(strata) == json.loads(qsd)
    strata, qsd = same_output(pair, "nbdinfo", "--list", "{list}")
    assert strata == qsd


def test_nbdinfo_map(pair):
    need_tool("nbdinfo")
    for args in (["--map", "{raw}"], ["--map", "{top}"], ["--map=qemu:allocation-depth", "{top}"],
                 ["--map", "--totals", "{top}"], ["--map", "--json", "{top}"]):
        strata, qsd = same_output(pair, "nbdinfo", *args)
        assert strata == qsd, args


def test_qemu_img_map_and_compare(pair):
    need_tool("qemu-img")
    for export in ("{raw}", "{top}"):
        strata, qsd = same_output(pair, "qemu-img", "map", "--output=json", "-f", "raw", export)
        assert json.loads(strata) == json.loads(qsd)
    for name in ("strata", "qsd"):
        r = run_tool("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                     pair.uri(name, "top"), os.path.join(pair.dirs[name], "top.qcow2"))
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        r = run_tool("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw",
                     pair.uri(name, "raw"), os.path.join(pair.dirs[name], "data.raw"))
        assert r.returncode == 0, (name, r.stdout, r.stderr)


# ---- data path, per implementation -----------------------------------------------------------

@pytest.fixture
def served(daemon):
    d = daemon()
    sock = os.path.join(d.dir, "nbd.sock")
    raw, top = build_images(d.dir)
    for args in ({"driver": "raw", "node-name": "raw",
                  "file": {"driver": "file", "filename": raw}},
                 {"driver": "qcow2", "node-name": "top",
                  "file": {"driver": "file", "filename": top}}):
        d.qmp.ok("blockdev-add", args)
    d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "raw", "name": "raw",
                                  "writable": True})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "e1", "node-name": "top", "name": "top"})
    d.uri = lambda export: "nbd+unix:///%s?socket=%s" % (export, sock)
    d.raw = raw
    d.top = top
    return d


def test_qemu_img_convert_from_and_to_nbd(served):
    need_tool("qemu-img")
    out = os.path.join(served.dir, "out.qcow2")
    r = run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", served.uri("top"), out,
                 timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_tool("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", out, served.top)
    assert r.returncode == 0, r.stdout + r.stderr
    # and into the writable export
    r = run_tool("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", out, served.uri("raw"),
                 timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_tool("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", served.uri("raw"), served.top)
    assert r.returncode == 0, r.stdout + r.stderr


def test_qemu_io_reads_and_writes(served):
    need_tool("qemu-io")
    r = run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 1M", "-c", "write -z 5M 64k",
                 "-c", "discard 6M 64k", "-c", "flush", served.uri("raw"))
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    r = run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 4M 1M", "-c",
                 "read -P 0 5M 64k", "-c", "read -P 0x11 1M 64k", served.uri("raw"))
    assert r.returncode == 0 and "error" not in r.stdout.lower() and \
        "fail" not in r.stdout.lower(), r.stdout + r.stderr
    r = run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x44 1M 2M", "-c",
                 "read -P 0x33 0 1M", "-c", "read -P 0 16M 1M", served.uri("top"))
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    # the bytes reached the file
    with open(served.raw, "rb") as f:
        f.seek(4 << 20)
        assert f.read(1 << 20) == b"\x5a" * (1 << 20)


def test_nbdcopy_both_directions(served):
    need_tool("nbdcopy")
    local = os.path.join(served.dir, "copy.raw")
    r = run_tool("nbdcopy", served.uri("top"), local, timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_tool("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", local, served.top)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_tool("nbdcopy", "--connections=4", local, served.uri("raw"), timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_tool("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", local, served.raw)
    assert r.returncode == 0, r.stdout + r.stderr


def fio_has_nbd():
    if not shutil.which("fio"):
        return False
    r = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True)
    return "nbd" in r.stdout.split()


def test_fio_verify(served):
    if not fio_has_nbd():
        pytest.skip("fio without the nbd ioengine")
    r = run_tool("fio", "--name=verify", "--ioengine=nbd", "--uri=" + served.uri("raw"),
                 "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M", "--offset=32M",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify:" not in r.stderr, r.stderr


def test_four_parallel_clients(served):
    need_tool("qemu-io")
    procs = []
    for i in range(4):
        procs.append(subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x%x %dM 4M" % (0x60 + i, 32 + 4 * i),
             served.uri("raw")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, out + err
    for i in range(4):
        r = run_tool("qemu-io", "-f", "raw", "-r", "-c",
                     "read -P 0x%x %dM 4M" % (0x60 + i, 32 + 4 * i), served.uri("raw"))
        assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
