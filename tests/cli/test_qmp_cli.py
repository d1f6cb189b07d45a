"""`strata qmp` (one-shot and shell) against the real qemu-storage-daemon as the QMP server.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_qmp_cli.py
"""

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QSD = shutil.which("qemu-storage-daemon")

pytestmark = pytest.mark.skipif(
    QSD is None, reason="qemu-storage-daemon is not installed (Debian package qemu-system-common)")


def strata_bin():
    path = Path(os.environ.get("STRATA_BIN", "build/strata"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"strata binary not found at {path}; build it or set STRATA_BIN")
    return str(path)


class Daemon:
    def __init__(self, tmp_path):
        self.socket = str(tmp_path / "qmp.sock")
        self.proc = subprocess.Popen(
            [QSD, "--chardev", f"socket,path={self.socket},server=on,wait=off,id=m",
             "--monitor", "chardev=m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start: " +
                                   self.proc.stderr.read().decode(errors="replace"))
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def qsd(tmp_path):
    daemon = Daemon(tmp_path)
    yield daemon
    daemon.stop()


def qmp(daemon, *args, options=()):
    return subprocess.run([strata_bin(), "qmp", *options, daemon.socket, *args],
                          capture_output=True, text=True, timeout=60)


def shell(daemon, lines, options=()):
    return subprocess.run([strata_bin(), "qmp", *options, daemon.socket],
                          input="".join(line + "\n" for line in lines),
                          capture_output=True, text=True, timeout=60)


def nodes(daemon):
    result = qmp(daemon, "query-named-block-nodes", "flat=true")
    assert result.returncode == 0, result.stderr
    return {node["node-name"]: node for node in json.loads(result.stdout)}


def test_query_version_prints_return_value_pretty(qsd):
    result = qmp(qsd, "query-version")
    assert result.returncode == 0, result.stderr
    version = json.loads(result.stdout)
    assert version["qemu"]["major"] >= 10
    assert "package" in version
    # 2-space indented, the return value only (no "return" wrapper).
    assert result.stdout.startswith("{\n  \"")
    assert "\"return\"" not in result.stdout
    assert result.stderr == ""


def test_compact_prints_one_line(qsd):
    for flag in ("--compact", "-c"):
        result = qmp(qsd, "query-version", options=(flag,))
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("\n") == 1
        assert json.loads(result.stdout)["qemu"]["major"] >= 10
    result = qmp(qsd, "query-version", options=("-p",))
    assert result.stdout.count("\n") > 3


def test_blockdev_add_then_query(qsd):
    result = qmp(qsd, "blockdev-add", "driver=null-co", "node-name=n0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
    assert nodes(qsd)["n0"]["drv"] == "null-co"


def test_values_are_json_when_valid_and_dotted_keys_nest(qsd):
    # size must arrive as a JSON integer (QEMU rejects a string) and read-only as a boolean;
    # file.* must become a nested object.
    result = qmp(qsd, "blockdev-add", "driver=raw", "node-name=r0", "read-only=true",
                 "file.driver=null-co", "file.size=1048576")
    assert result.returncode == 0, result.stderr
    node = nodes(qsd)["r0"]
    assert node["drv"] == "raw"
    assert node["ro"] is True
    assert node["image"]["virtual-size"] == 1048576
    # A whole JSON object as one value works too.
    result = qmp(qsd, "blockdev-add", "driver=raw", "node-name=r1",
                 'file={"driver": "null-co", "size": 4096}')
    assert result.returncode == 0, result.stderr
    assert nodes(qsd)["r1"]["image"]["virtual-size"] == 4096


def test_error_reply_goes_to_stderr_with_exit_1(qsd):
    assert qmp(qsd, "blockdev-add", "driver=null-co", "node-name=n0").returncode == 0
    result = qmp(qsd, "blockdev-add", "driver=null-co", "node-name=n0")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error: Duplicate nodes with node-name='n0'" in result.stderr
    assert "GenericError" in result.stderr

    result = qmp(qsd, "no-such-command")
    assert result.returncode == 1
    assert "error: The command no-such-command has not been found" in result.stderr
    assert "CommandNotFound" in result.stderr


def test_raw_json_request(qsd):
    result = qmp(qsd, '{"execute": "query-version", "id": 7}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["qemu"]["major"] >= 10


def test_bad_key_value_is_reported_before_sending(qsd):
    result = qmp(qsd, "blockdev-add", "driver")
    assert result.returncode == 1
    assert "Expected a key=value pair, got 'driver'" in result.stderr
    result = qmp(qsd, "blockdev-add", "a=1", "a=2")
    assert result.returncode == 1
    assert 'Cannot set "a" multiple times' in result.stderr


def test_connection_failure(tmp_path):
    missing = str(tmp_path / "missing.sock")
    result = subprocess.run([strata_bin(), "qmp", missing, "query-version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert missing in result.stderr
    assert "No such file or directory" in result.stderr


def export_setup(daemon, tmp_path):
    for args in (["blockdev-add", "driver=null-co", "node-name=n0"],
                 ["nbd-server-start", "addr.type=unix", f"addr.data.path={tmp_path}/nbd.sock"],
                 ["block-export-add", "type=nbd", "id=e0", "node-name=n0"]):
        result = qmp(daemon, *args)
        assert result.returncode == 0, result.stderr


def test_verbose_prints_events_before_reply_to_stderr(qsd, tmp_path):
    export_setup(qsd, tmp_path)
    # QEMU emits BLOCK_EXPORT_DELETED before the reply to block-export-del.
    result = qmp(qsd, "block-export-del", "id=e0", options=("--verbose",))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["BLOCK_EXPORT_DELETED"]
    assert events[0]["data"] == {"id": "e0"}

    assert qmp(qsd, "block-export-add", "type=nbd", "id=e1", "node-name=n0").returncode == 0
    result = qmp(qsd, "block-export-del", "id=e1")
    assert result.returncode == 0
    assert result.stderr == ""


def test_shell_over_a_pipe(qsd, tmp_path):
    export_setup(qsd, tmp_path)
    result = shell(qsd, [
        "query-block-exports",
        "block-export-del id=e0",
        '{"execute": "query-version", "id": "raw-1"}',
        "blockdev-add driver",
        "{not json",
        "blockdev-add driver=null-co node-name=n0",
        "query-named-block-nodes flat=true",
    ], options=("--compact",))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("(QEMU) ")
    assert lines[0] == ""
    messages = [json.loads(line) for chunk in lines[1:] for line in chunk.splitlines()]
    exports, event, deleted, version, duplicate, query = messages
    assert exports["return"][0]["id"] == "e0"
    assert event["event"] == "BLOCK_EXPORT_DELETED"
    assert deleted == {"return": {}}
    assert version["id"] == "raw-1" and version["return"]["qemu"]["major"] >= 10
    assert duplicate["error"]["desc"] == "Duplicate nodes with node-name='n0'"
    assert [n["node-name"] for n in query["return"]] == ["n0"]
    # Malformed lines are reported and the shell goes on.
    assert "Expected a key=value pair, got 'driver'" in result.stderr
    assert "{not json" in result.stderr


def test_shell_shows_events_that_arrive_between_commands(qsd, tmp_path):
    image = tmp_path / "created.img"
    proc = subprocess.Popen([strata_bin(), "qmp", "-c", qsd.socket], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("blockdev-create job-id=j0 options.driver=file "
                     f"options.filename={image} options.size=1048576\n")
    proc.stdin.flush()
    time.sleep(1)  # the job concludes after the reply, while the shell waits for input
    proc.stdin.write("query-jobs\n")
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    messages = [json.loads(line) for chunk in stdout.split("(QEMU) ") for line in chunk.splitlines()]
    statuses = [m["data"]["status"] for m in messages if m.get("event") == "JOB_STATUS_CHANGE"]
    assert "concluded" in statuses
    # Every event of the job is shown before the query-jobs reply, which comes last.
    assert messages[-1]["return"][0]["status"] == "concluded"
    assert image.exists()


def test_shell_quit_is_a_qmp_command(qsd):
    result = shell(qsd, ["quit", "query-version"])
    assert result.returncode == 0, result.stderr
    assert '"return": {}' in result.stdout
    qsd.proc.wait(timeout=10)
    assert qsd.proc.returncode == 0


def read_until(fd, needle, timeout=10):
    """Reads the pty until `needle` shows up (None: until EOF) or the timeout passes."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle is None or needle not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {data!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                if needle is None:
                    return data
                raise AssertionError(f"EOF while waiting for {needle!r}; got {data!r}")
            data += chunk
    return data


def wait_child(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("strata qmp did not exit")


def test_shell_on_a_terminal_edits_lines_and_keeps_history(qsd, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["HOME"] = str(home)
        os.environ["TERM"] = "dumb"
        os.execv(strata_bin(), [strata_bin(), "qmp", "--compact", qsd.socket])
    exit_code = None
    try:
        banner = read_until(fd, b"(QEMU) ")
        assert b"Connected to QEMU 10." in banner
        # editline switches the terminal to raw mode after printing the prompt; input typed before
        # that is read in canonical mode (where ^D is EOF, not a key), so give it a moment.
        time.sleep(0.3)
        # Type a wrong name, fix it with backspace, run it.
        os.write(fd, b"query-versionX\x7f\r")
        reply = read_until(fd, b'"major":10')
        assert b"CommandNotFound" not in reply
        if b"(QEMU) " not in reply.split(b'"major":10')[1]:  # the next prompt may come with it
            read_until(fd, b"(QEMU) ")
        time.sleep(0.3)
        os.write(fd, b"\x04")  # Ctrl-D leaves the shell
        read_until(fd, None)
    finally:
        exit_code = wait_child(pid)
        os.close(fd)
    assert exit_code == 0
    history = (home / ".strata_qmp_history").read_text()
    assert "query-version" in history
    assert "query-versionX" not in history
