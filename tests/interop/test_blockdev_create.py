"""blockdev-create and the job commands on strata and qemu-storage-daemon side by side.

Each scenario runs the same QMP sequence on both daemons (each in its own directory) and
compares what a client sees: every reply, the JOB_STATUS_CHANGE events in order (and whether
they came before or after the reply), query-jobs, and query-named-block-nodes of the created
image opened with blockdev-add. Images the strata daemon creates must also pass `qemu-img check`.
"""

import json
import os
import subprocess
import time

import pytest

from conftest import Daemon, _resolve_impl, need_tool
from helpers import norm

MiB = 1 << 20


@pytest.fixture
def pair(workdir):
    """start() -> (strata, qsd) daemons, both negotiated."""
    started = []

    def start():
        for index, name in enumerate(("strata", "qsd")):
            d = Daemon(_resolve_impl(name), workdir, index, [])
            started.append(d)
            d.connect()
            d.negotiate()
        return started

    yield start
    problems = []
    for d in reversed(started):
        problems.extend(d.stop())
    if problems:
        pytest.fail("daemon teardown:\n" + "\n".join(problems), pytrace=False)


class Session:
    """Runs commands on one daemon and records a normalised transcript."""

    def __init__(self, d):
        self.d = d
        self.q = d.qmp
        self.dir = d.dir
        self.log = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def norm(self, value):
        return norm(value, self.dir)

    def events_now(self, timeout=0.3):
        """JOB_STATUS_CHANGE events that arrive within `timeout` (none expected after)."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            try:
                msg = self.q.recv_msg(remaining)
            except Exception:
                return out
            if isinstance(msg, dict) and "event" in msg:
                out.append((msg["event"], msg.get("data")))

    def cmd(self, name, args=None, record=True):
        r = self.q.cmd_args(name, args)
        before = []
        for e in self.q.events_before_reply:
            e["_consumed"] = True  # not to be found again by wait_event
            before.append((e["event"], e.get("data")))
        entry = {"cmd": name, "reply": self.norm(r), "events-before": before}
        if record:
            self.log.append(entry)
        return r

    def wait_job(self, job_id, status="concluded", timeout=30.0):
        """Records the job's status changes after the reply until it reaches `status`."""
        seen = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1] != status:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "%s: job %s stuck after %r" % (self.d.impl.name, job_id, seen)
            ev = self.q.wait_event("JOB_STATUS_CHANGE", timeout=remaining)
            assert ev["data"]["id"] == job_id, ev
            seen.append(ev["data"]["status"])
        self.log.append({"events-after": seen})
        return seen

    def create(self, job_id, options, status="concluded"):
        r = self.cmd("blockdev-create", {"job-id": job_id, "options": options})
        # A job that fails before it first yields (e.g. the file cannot be created) has concluded
        # before the reply, on both daemons.
        done = (ev[1] == {"id": job_id, "status": status} for ev in self.log[-1]["events-before"])
        if "return" in r and not any(done):
            self.wait_job(job_id, status)
        return r

    def jobs(self):
        return self.norm(self.cmd("query-jobs")["return"])

    def nodes(self):
        out = {}
        for n in self.q.cmd_args("query-named-block-nodes", {"flat": True})["return"]:
            n = self.norm(n)
            if n["drv"] == "file":
                # KNOWN DIFFERENCE of the file driver (see test_qcow2_read.py): QEMU rounds a
                # file's length up to 512 bytes, strata reports the exact length. The lengths of
                # the files themselves are compared separately.
                n["image"]["virtual-size"] = (n["image"]["virtual-size"] + 511) // 512 * 512
            out[n["node-name"]] = n
        return out

    def file_sizes(self):
        return {name: os.path.getsize(self.path(name)) for name in sorted(os.listdir(self.dir))
                if name.endswith((".qcow2", ".raw", ".data", ".img"))}


def sessions(pair):
    return [Session(d) for d in pair()]


def differences(a, b, path=""):
    """Paths where a and b differ, with both values (for readable failures)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out.extend(differences(a.get(key, "<missing>"), b.get(key, "<missing>"),
                                   "%s.%s" % (path, key)))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(differences(x, y, "%s[%d]" % (path, i)))
        return out
    return [] if a == b else ["%s: strata %r, qsd %r" % (path, a, b)]


def compare(strata, qsd):
    assert len(strata.log) == len(qsd.log)
    for s, q in zip(strata.log, qsd.log):
        assert s == q, "\n".join(differences(s, q))


def qemu_img_check(path):
    need_tool("qemu-img")
    r = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def make_file_node(s, name="img.qcow2", node="f"):
    s.create("mk-" + node, {"driver": "file", "filename": s.path(name), "size": 0})
    s.cmd("job-dismiss", {"id": "mk-" + node})
    s.cmd("blockdev-add", {"driver": "file", "node-name": node, "filename": s.path(name)})


QCOW2_OPTION_SETS = {
    "defaults": ({}, {}),
    "v2": ({"version": "v2", "cluster-size": 4096}, {}),
    "features": ({"extended-l2": True, "cluster-size": 131072, "refcount-bits": 1,
                  "lazy-refcounts": True, "compression-type": "zstd"},
                 {"lazy-refcounts": True, "l2-cache-size": 262144}),
    "refcount64": ({"refcount-bits": 64, "cluster-size": 512}, {"cache-size": 1 << 20}),
    "prealloc-metadata": ({"preallocation": "metadata"}, {}),
    "prealloc-full": ({"preallocation": "full", "cluster-size": 65536}, {}),
    "backing": ({"backing-file": "base.raw", "backing-fmt": "raw"}, {"backing": None}),
}


@pytest.mark.parametrize("kind", sorted(QCOW2_OPTION_SETS))
def test_create_qcow2_then_open_same_as_qsd(pair, kind):
    create_options, open_options = QCOW2_OPTION_SETS[kind]
    ss = sessions(pair)
    for s in ss:
        make_file_node(s)
        options = {"driver": "qcow2", "file": "f", "size": 4 * MiB}
        options.update(create_options)
        s.create("c1", options)
        s.jobs()
        s.cmd("job-dismiss", {"id": "c1"})
        s.jobs()
        add = {"driver": "qcow2", "node-name": "disk", "file": "f"}
        add.update(open_options)
        s.cmd("blockdev-add", add)
        s.log.append({"nodes": s.nodes(), "sizes": s.file_sizes()})
        s.cmd("blockdev-del", {"node-name": "disk"})
    compare(*ss)
    open(ss[0].path("base.raw"), "wb").close()
    info = qemu_img_check(ss[0].path("img.qcow2"))
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0, info


def test_create_qcow2_with_data_file_same_as_qsd(pair):
    ss = sessions(pair)
    for s in ss:
        make_file_node(s)
        make_file_node(s, "img.data", "df")
        s.create("c1", {"driver": "qcow2", "file": "f", "data-file": "df", "data-file-raw": True,
                        "size": 2 * MiB})
        s.jobs()
        s.log.append({"data-size": os.path.getsize(s.path("img.data"))})
        s.cmd("job-dismiss", {"id": "c1"})
        s.cmd("blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": "f",
                               "data-file": "df"})
        s.log.append({"nodes": s.nodes()})
    compare(*ss)


def test_create_file_same_as_qsd(pair):
    ss = sessions(pair)
    for s in ss:
        s.create("a", {"driver": "file", "filename": s.path("a.raw"), "size": 3 * MiB,
                       "preallocation": "falloc"})
        s.create("b", {"driver": "file", "filename": s.path("b.raw"), "size": 1000,
                       "preallocation": "full", "nocow": True, "extent-size-hint": 65536})
        s.create("c", {"driver": "file", "filename": s.path("c.raw"), "size": 4096})
        s.create("d", {"driver": "file", "filename": s.path("nodir/d.raw"), "size": 0})
        s.create("e", {"driver": "file", "filename": s.path("e.raw"), "size": 0,
                       "preallocation": "metadata"})
        s.jobs()
        for job in "abcde":
            s.cmd("job-dismiss", {"id": job})
        s.jobs()
        s.log.append({"sizes": [os.path.getsize(s.path(n)) for n in ("a.raw", "b.raw", "c.raw")]})
    compare(*ss)


QCOW2_ERRORS = [
    {"cluster-size": 1000},
    {"cluster-size": 256},
    {"cluster-size": 4 * MiB},
    {"size": 4 * MiB + 1},
    {"version": "v2", "lazy-refcounts": True},
    {"version": "v2", "compression-type": "zstd"},
    {"version": "v2", "refcount-bits": 8},
    {"refcount-bits": 3},
    {"refcount-bits": 128},
    {"data-file-raw": True},
    {"backing-fmt": "raw"},
    {"extended-l2": True, "cluster-size": 4096},
    {"preallocation": "full", "backing-file": "base.raw"},
    {"encrypt": {"format": "luks"}},
    {"encrypt": {"format": "luks", "key-secret": "sec0"}},
    {"file": "nonode"},
    {"data-file": "nonode"},
]


def test_create_qcow2_errors_same_as_qsd(pair):
    ss = sessions(pair)
    for s in ss:
        make_file_node(s)
        for i, extra in enumerate(QCOW2_ERRORS):
            options = {"driver": "qcow2", "file": "f", "size": 4 * MiB}
            options.update(extra)
            s.create("e%d" % i, options)
            s.jobs()
            s.cmd("job-dismiss", {"id": "e%d" % i})
    compare(*ss)
    assert any("error" in entry.get("reply", {}).get("return", [{}])[0]
               for entry in ss[1].log if entry.get("cmd") == "query-jobs"
               and entry["reply"].get("return"))


def test_command_errors_same_as_qsd(pair):
    ss = sessions(pair)
    for s in ss:
        make_file_node(s)
        s.create("j", {"driver": "qcow2", "file": "f", "size": MiB})
        # job id in use (a concluded, undismissed job keeps its id)
        s.cmd("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f",
                                                              "size": MiB}})
        # job ids and node names live in separate namespaces
        s.create("f", {"driver": "qcow2", "file": "f", "size": MiB})
        s.cmd("job-dismiss", {"id": "f"})
        for bad in ("1x", "", "a b", "x#"):
            s.cmd("blockdev-create", {"job-id": bad, "options": {"driver": "qcow2", "file": "f",
                                                                  "size": MiB}})
        s.cmd("blockdev-create", {"options": {"driver": "file", "filename": s.path("x"),
                                              "size": 0}})
        s.cmd("blockdev-create", {"job-id": "r", "options": {"driver": "raw"}})
        s.cmd("blockdev-create", {"job-id": "r", "options": {"driver": "raw", "size": 1}})
        s.cmd("blockdev-create", {"job-id": "r", "options": {"driver": "nosuch"}})
        s.cmd("blockdev-create", {"job-id": "r", "options": {"driver": "qcow2", "size": MiB}})
        s.cmd("blockdev-create", {"job-id": "r", "options": {"driver": "qcow2", "file": "f",
                                                              "size": MiB, "bogus": 1}})
        s.cmd("blockdev-create", {"job-id": "r", "options": {"driver": "qcow2", "file": "f",
                                                              "size": MiB,
                                                              "preallocation": "sparse"}})
        for verb in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize"):
            s.cmd(verb, {"id": "j"})
            s.cmd(verb, {"id": "nope"})
        s.cmd("job-cancel", {"id": "j", "force": True})
        s.cmd("job-dismiss", {"id": "nope"})
        s.cmd("job-dismiss", {})
        s.jobs()
        s.cmd("job-dismiss", {"id": "j"})
        s.cmd("job-dismiss", {"id": "j"})
        s.jobs()
    compare(*ss)


def test_node_busy_and_read_only_same_as_qsd(pair):
    ss = sessions(pair)
    for s in ss:
        make_file_node(s)
        s.create("c", {"driver": "qcow2", "file": "f", "size": MiB})
        s.cmd("job-dismiss", {"id": "c"})
        s.cmd("blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": "f"})
        s.create("busy", {"driver": "qcow2", "file": "f", "size": MiB})
        s.create("ro", {"driver": "file", "filename": s.path("ro.img"), "size": 0})
        s.cmd("blockdev-add", {"driver": "file", "node-name": "rof", "filename": s.path("ro.img"),
                               "read-only": True})
        s.create("ro2", {"driver": "qcow2", "file": "rof", "size": MiB})
        s.jobs()
        s.log.append({"nodes": s.nodes()})
    compare(*ss)
    assert "Permission conflict on node 'f'" in json.dumps(ss[1].log)


def test_running_job_verbs_same_as_qsd(pair):
    """A long file creation (preallocation=full) is caught while running."""
    ss = sessions(pair)
    for s in ss:
        r = s.cmd("blockdev-create", {"job-id": "big", "options": {
            "driver": "file", "filename": s.path("big.raw"), "size": 2 << 30,
            "preallocation": "full"}})
        assert r == {"return": {}}
        s.jobs()
        s.cmd("job-pause", {"id": "big"})
        s.cmd("job-pause", {"id": "big"})
        s.jobs()
        for verb in ("job-complete", "job-finalize", "job-dismiss"):
            s.cmd(verb, {"id": "big"})
        s.cmd("job-resume", {"id": "big"})
        s.cmd("job-resume", {"id": "big"})
        s.cmd("job-cancel", {"id": "big"})
        s.wait_job("big", "concluded", timeout=120)
        s.jobs()
        s.cmd("job-dismiss", {"id": "big"})
        os.unlink(s.path("big.raw"))
    compare(*ss)
