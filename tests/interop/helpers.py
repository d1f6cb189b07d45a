"""Shared expectations and normalisation for the interop scenarios.

Everything here encodes behaviour observed on qemu-storage-daemon 10.0.2.
"""

import json
import os
import re
import time

GEN_NAME = re.compile(r"^#block\d+$")


# -- normalisation ------------------------------------------------------------

def norm(value, workdir=None):
    """Normalise things a client does not care about.

    * generated node names '#blockNNN' -> '#block'
    * 'json:{...}' pseudo-filenames -> parsed dicts (key order is hash order in QEMU)
    * the test's temp dir -> 'DIR'
    Key order of dicts is irrelevant to == anyway.
    """
    if isinstance(value, dict):
        return {k: norm(v, workdir) for k, v in value.items()}
    if isinstance(value, list):
        return [norm(v, workdir) for v in value]
    if isinstance(value, str):
        if GEN_NAME.match(value):
            return "#block"
        if value.startswith("json:"):
            return {"json:": norm(json.loads(value[5:]), workdir)}
        if workdir and workdir in value:
            return value.replace(workdir, "DIR")
    return value


def by_name(nodes):
    return {n["node-name"]: n for n in nodes}


# -- query-named-block-nodes expectations ----------------------------------------

def actual_size(path):
    return os.stat(path).st_blocks * 512


def node_info(node_name, drv, filename, virtual_size, *, fmt=None, ro=False, active=True,
              actual=0, detect_zeroes="off", direct=False, no_flush=False, dirty_flag=True,
              format_specific=None):
    """One BlockDeviceInfo entry exactly as QSD 10.0.2 reports it."""
    image = {"virtual-size": virtual_size, "filename": filename, "format": fmt or drv,
             "actual-size": actual}
    if dirty_flag:
        image["dirty-flag"] = False
    if format_specific is not None:
        image["format-specific"] = format_specific
    return {
        "node-name": node_name, "drv": drv, "ro": ro, "active": active, "file": filename,
        "backing_file_depth": 0, "encrypted": False, "detect_zeroes": detect_zeroes,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": True, "direct": direct, "no-flush": no_flush},
        "image": image,
    }


def file_node(node_name, path, **kw):
    """'file' driver node: format 'file', format-specific {type: file, data: {}} (ext4)."""
    kw.setdefault("actual", actual_size(path))
    kw.setdefault("format_specific", {"type": "file", "data": {}})
    return node_info(node_name, "file", path, os.path.getsize(path), **kw)


def raw_node(node_name, filename, virtual_size, actual, dirty_flag=True, **kw):
    return node_info(node_name, "raw", filename, virtual_size, actual=actual,
                     dirty_flag=dirty_flag, **kw)


def null_node(node_name, filename="null-co://", size=1 << 30, **kw):
    return node_info(node_name, "null-co", filename, size, dirty_flag=False, **kw)


def json_filename(obj):
    return "json:" + json.dumps(obj)


# -- lock bytes ---------------------------------------------------------------

def lock_bytes(pid, path):
    """Set of byte offsets locked (OFD or POSIX) by process PID on file PATH.

    Read from /proc/PID/fdinfo/* 'lock:' lines, which carry dev:inode and the
    start/end byte of each lock.
    """
    st = os.stat(path)
    dev = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    held = set()
    kinds = set()
    fddir = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(fddir):
        try:
            with open(os.path.join(fddir, fd)) as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith("lock:"):
                continue
            parts = line.split()
            if dev not in parts:
                continue
            i = parts.index(dev)
            start, end = int(parts[i + 1]), parts[i + 2]
            end = start if end == "EOF" else int(end)
            held.update(range(start, end + 1))
            kinds.add((parts[2], parts[4]))  # (OFDLCK|POSIX, READ|WRITE)
    return held, kinds


def proc_locks(path):
    """/proc/locks lines on PATH (OFD locks show pid -1)."""
    st = os.stat(path)
    key = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    with open("/proc/locks") as f:
        return [line.split() for line in f if key in line.split()]


def delete_export_after_clients_left(q, export_id, timeout=10.0):
    """block-export-del once the clients that just disconnected are gone: a client process that
    exited has closed its socket, but the server may not have seen the hang-up yet, and until
    then the export is "still in use" (on both daemons)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = q.cmd("block-export-del", id=export_id)
        if "return" in reply or time.monotonic() > deadline or \
                "still in use" not in reply["error"]["desc"]:
            return reply
        time.sleep(0.05)
