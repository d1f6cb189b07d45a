"""The daemon's own command line: --daemonize, --pidfile, signals, stdio and pretty monitors,
--object, and option errors. Each scenario runs against strata and qemu-storage-daemon."""

import json
import os
import signal
import subprocess
import time

import pytest

from qmp_client import QMPClient


def start_argv(impl, *args):
    return list(impl.argv) + list(args)


def wait_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_daemonize_and_pidfile(impl, workdir):
    sock = os.path.join(workdir, "qmp.sock")
    pidfile = os.path.join(workdir, "daemon.pid")
    # The parent returns only after startup finished: the socket exists when it exits.
    proc = subprocess.run(start_argv(impl, "--chardev",
                                     "socket,path=%s,server=on,wait=off,id=m" % sock,
                                     "--monitor", "chardev=m", "--daemonize",
                                     "--pidfile", pidfile),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(sock)
    pid = int(open(pidfile).read().strip())
    assert pid != proc.returncode and pid > 1
    assert os.stat(pidfile).st_mode & 0o777 == 0o600
    qmp = QMPClient(sock)
    qmp.negotiate()
    assert "return" in qmp.cmd("query-version")
    qmp.close()
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert not os.path.exists(pidfile)


def test_second_daemon_with_same_pidfile_refuses(impl, workdir, daemon):
    pidfile = os.path.join(workdir, "daemon.pid")
    daemon("--pidfile", pidfile)
    proc = subprocess.run(start_argv(impl, "--pidfile", pidfile), capture_output=True,
                          timeout=30)
    assert proc.returncode == 1
    assert b"Cannot lock pid file" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(impl, workdir, sig):
    sock = os.path.join(workdir, "qmp.sock")
    proc = subprocess.Popen(start_argv(impl, "--chardev",
                                       "socket,path=%s,server=on,wait=off,id=m" % sock,
                                       "--monitor", "m", "--blockdev",
                                       "driver=null-co,node-name=n0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert b"AddressSanitizer" not in err and b"runtime error" not in err


def run_stdio(impl, lines, *extra):
    proc = subprocess.run(start_argv(impl, "--chardev", "stdio,id=m", "--monitor",
                                     "chardev=m" + "".join(extra)),
                          input="".join(l + "\n" for l in lines).encode(),
                          capture_output=True, timeout=30)
    return proc


def test_stdio_monitor(impl):
    proc = run_stdio(impl, ['{"execute":"qmp_capabilities"}',
                            '{"execute":"blockdev-add","arguments":{"driver":"null-co",'
                            '"node-name":"n0"},"id":"a"}',
                            '{"execute":"quit"}'])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split(b"\r\n")
    assert lines[-1] == b""
    messages = [json.loads(l) for l in lines[:-1]]
    assert list(messages[0]) == ["QMP"]
    assert messages[1] == {"return": {}}
    assert messages[2] == {"return": {}, "id": "a"}
    assert messages[3] == {"return": {}}
    # QEMU's compact form: ", " between members, ": " after keys.
    assert lines[2] == b'{"return": {}, "id": "a"}'


def test_pretty_monitor_layout(impl):
    proc = run_stdio(impl, ['{"execute":"qmp_capabilities"}',
                            '{"execute":"x-debug-query-block-graph"}',
                            '{"execute":"quit"}'], ",pretty=on")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert '{\r\n    "return": {\r\n    }\r\n}\r\n' in text
    graph = text.split('{\r\n    "return": {\r\n    }\r\n}\r\n')[1]
    assert graph.startswith('{\r\n    "return": {\r\n        "')
    assert '"edges": [\r\n        ]' in graph


def test_object_iothread_on_command_line(impl, daemon):
    d = daemon("--object", "iothread,id=io0")
    assert d.qmp.cmd("object-add", qom_type="iothread", id="io0") == {
        "error": {"class": "GenericError",
                  "desc": "attempt to add duplicate property 'io0' to object (type 'container')"}}
    assert d.qmp.cmd("object-del", id="io0") == {"return": {}}


def test_blockdev_option_error_exits(impl, workdir):
    missing = os.path.join(workdir, "missing.img")
    arg = "driver=file,node-name=f0,filename=%s" % missing
    proc = subprocess.run(start_argv(impl, "--blockdev", arg), capture_output=True, timeout=30)
    assert proc.returncode == 1
    message = proc.stderr.decode().strip().split(": ", 1)[1]
    assert message == "--blockdev %s: Could not open '%s': No such file or directory" % (
        arg, missing)


def test_blockdev_json_on_command_line(impl, daemon):
    d = daemon("--blockdev", '{"driver":"null-co","node-name":"n0","size":4096}')
    nodes = d.qmp.cmd("query-named-block-nodes")["return"]
    assert [(n["node-name"], n["image"]["virtual-size"]) for n in nodes] == [("n0", 4096)]
