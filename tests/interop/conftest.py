"""Interop harness: every scenario runs against `strata daemon` and qemu-storage-daemon.

Environment:
  STRATA_BIN            strata binary (default <repo>/build/strata); run as `STRATA_BIN daemon ARGS...`
  STRATA_INTEROP_IMPLS  comma list of implementations to run (default "strata,qsd")
  QSD_BIN               qemu-storage-daemon binary (default: found on PATH)
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qmp_client import QMPClient, QMPError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IMPLS = [s.strip() for s in os.environ.get("STRATA_INTEROP_IMPLS", "strata,qsd").split(",")
         if s.strip()]
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
                     "WARNING: ThreadSanitizer")
START_TIMEOUT = 10.0
QUIT_TIMEOUT = 10.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs(*commands): skip unless the implementation's query-commands lists every "
        "named QMP command (for commands beyond strata's first milestone)")


class Impl:
    def __init__(self, name, argv):
        self.name = name
        self.argv = argv

    def __repr__(self):
        return "Impl(%s)" % self.name


def _resolve_impl(name):
    if name == "strata":
        binary = os.environ.get("STRATA_BIN") or str(REPO / "build" / "strata")
        if not os.path.exists(binary):
            pytest.skip("strata binary %s does not exist (build it or set STRATA_BIN)" % binary)
        return Impl("strata", [binary, "daemon"])
    if name == "qsd":
        binary = os.environ.get("QSD_BIN") or shutil.which("qemu-storage-daemon")
        if not binary or not os.path.exists(binary):
            pytest.skip("qemu-storage-daemon is not installed; qsd variant skipped")
        return Impl("qsd", [binary])
    raise pytest.UsageError("unknown implementation %r in STRATA_INTEROP_IMPLS" % name)


@pytest.fixture(params=IMPLS)
def impl(request):
    return _resolve_impl(request.param)


@pytest.fixture
def workdir():
    """A short temp dir (unix socket paths must stay < 108 bytes)."""
    d = tempfile.mkdtemp(prefix="st-", dir="/tmp")
    yield d
    # undo `chattr +i` etc. that tests may have left behind
    for root, _dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            if not os.access(p, os.W_OK) or _is_immutable(p):
                subprocess.run(["chattr", "-i", p], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _is_immutable(path):
    try:
        r = subprocess.run(["lsattr", "-d", path], capture_output=True, text=True)
        return "i" in r.stdout.split(" ")[0]
    except OSError:
        return False


class Daemon:
    """One running daemon process with a negotiated (by default) QMP connection."""

    def __init__(self, impl, workdir, index, args, env=None):
        self.impl = impl
        self.dir = os.path.join(workdir, "d%d" % index)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "qmp.sock")
        assert len(self.sock.encode()) < 100, self.sock
        self.args = list(args)
        self.argv = impl.argv + [
            "--chardev", "socket,path=%s,server=on,wait=off,id=mon0" % self.sock,
            "--monitor", "chardev=mon0"] + self.args
        self.stdout_path = os.path.join(self.dir, "stdout")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, cwd=self.dir, env=env)
        self.pid = self.proc.pid
        self.qmp = None
        self.negotiated = False
        self.stopped = False

    # -- lifecycle -------------------------------------------------------
    def connect(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("%s exited with %s before its QMP socket appeared; stderr:\n%s"
                                     % (self.impl.name, self.proc.returncode, self.stderr()))
            if os.path.exists(self.sock):
                try:
                    self.qmp = QMPClient(self.sock)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise AssertionError("%s: QMP socket %s did not appear within %ss"
                                     % (self.impl.name, self.sock, START_TIMEOUT))
            time.sleep(0.02)
        return self.qmp

    def negotiate(self):
        self.qmp.negotiate()
        self.negotiated = True

    def stderr(self):
        self._err.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_exit(self, timeout=QUIT_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """Quit via QMP (kill after a timeout); return a list of failure strings."""
        if self.stopped:
            return []
        self.stopped = True
        problems = []
        quit_ok = False
        if self.proc.poll() is None and self.qmp is not None and not self.qmp.closed:
            try:
                if not self.negotiated:
                    self.qmp.cmd_args("qmp_capabilities")
                r = self.qmp.cmd_args("quit")
                quit_ok = "return" in r
                if not quit_ok:
                    problems.append("quit failed: %r" % (r,))
            except QMPError as e:
                problems.append("quit: %s" % e)
        elif self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        rc = self.wait_exit()
        if rc is None:
            problems.append("%s did not exit within %ss after quit; killed"
                            % (self.impl.name, QUIT_TIMEOUT))
            self.proc.kill()
            rc = self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        self._out.close()
        err = self.stderr()
        self._err.close()
        if rc < 0 and rc != -signal.SIGKILL:
            problems.append("%s died from signal %d" % (self.impl.name, -rc))
        elif quit_ok and rc != 0:
            problems.append("%s exited with status %d after quit" % (self.impl.name, rc))
        for m in SANITIZER_MARKERS:
            if m in err:
                problems.append("sanitizer report (%r) on stderr" % m)
                break
        if problems:
            problems.append("stderr of %s:\n%s" % (self.impl.name, err))
        return problems


@pytest.fixture
def daemon(impl, workdir, request):
    """Factory: daemon(*extra_args, negotiate=True) -> Daemon (d.qmp is the QMP client).

    Honours @pytest.mark.needs("cmd", ...): skips when the implementation's
    query-commands lacks one of them.
    """
    started = []
    needs = []
    for m in request.node.iter_markers("needs"):
        needs.extend(m.args)

    def start(*args, negotiate=True, connect=True, env=None):
        d = Daemon(impl, workdir, len(started), args, env)
        started.append(d)
        if not connect:
            return d
        d.connect()
        if negotiate or needs:
            d.negotiate()
        if needs:
            r = d.qmp.cmd_args("query-commands")
            have = {c["name"] for c in r.get("return", [])}
            missing = [c for c in needs if c not in have]
            if missing:
                pytest.skip("%s lacks QMP command(s) %s" % (impl.name, ", ".join(missing)))
        return d

    start.impl = impl
    start.workdir = workdir
    yield start
    problems = []
    for d in reversed(started):
        problems.extend(d.stop())
    if problems:
        pytest.fail("daemon teardown:\n" + "\n".join(problems), pytrace=False)


# -- tools ---------------------------------------------------------------

def need_tool(name):
    path = shutil.which(name)
    if not path:
        pytest.skip("%s is not installed" % name)
    return path


def run_tool(name, *args, timeout=30):
    need_tool(name)
    return subprocess.run([name] + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def qemu_io():
    need_tool("qemu-io")

    def run(*args):
        return run_tool("qemu-io", *args)
    return run


def make_raw(path, size=1 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_qcow2(path, size=1 << 20):
    r = run_tool("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    assert r.returncode == 0, r.stderr
    return path
