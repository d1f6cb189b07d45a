"""Helpers shared by the benchmark scripts that drive strata daemon and qemu-storage-daemon over
QMP (bench-mirror): sizes, a random-data qcow2 image, and starting a daemon."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
from qmp_client import QMPClient  # noqa: E402


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def make_random_qcow2(path, size):
    """A qcow2 image of `size` bytes, every byte written with random data."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    raw = path + ".raw"
    with open(raw, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, path],
                   check=True)
    os.unlink(raw)


def start_daemon(kind, strata, workdir, name):
    """Starts `strata daemon` (kind "strata") or qemu-storage-daemon with a QMP socket in
    `workdir`; returns (process, negotiated QMPClient)."""
    sock = os.path.join(workdir, "qmp-%s.sock" % kind)
    if os.path.exists(sock):
        os.unlink(sock)
    argv = ([strata, "daemon"] if kind == "strata" else ["qemu-storage-daemon"])
    argv += ["--chardev", "socket,path=%s,server=on,wait=off,id=m" % sock,
             "--monitor", "chardev=m"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=workdir)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit("%s: %s did not start" % (name, kind))
        time.sleep(0.02)
    q = QMPClient(sock)
    q.negotiate()
    return proc, q


def wait_event(q, name, timeout=3600):
    """The data of the next event called `name` (events already received count)."""
    for ev in q.events:
        if ev.get("event") == name and not ev.get("_seen"):
            ev["_seen"] = True
            return ev.get("data", {})
    deadline = time.monotonic() + timeout
    while True:
        msg = q.recv_msg(max(0.001, deadline - time.monotonic()))
        if isinstance(msg, dict) and msg.get("event") == name:
            msg["_seen"] = True
            return msg.get("data", {})


def stop_daemon(proc, q):
    q.cmd_args("quit")
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
