"""NBD server and block exports: QMP commands, command line, limits and hostile clients.

Every scenario runs against strata and qemu-storage-daemon (expectations observed on QSD 10.0.2).
Raw-socket scenarios use nbd_raw.RawNBD so the bytes on the wire are exactly the test's.
"""

import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import nbd_raw
from conftest import _resolve_impl
from nbd_raw import RawNBD

SIZE = 64 << 20
MAX = 32 << 20


def start(daemon, *extra, writable=True, server_args=None):
    """A daemon with node 'disk' (raw over a 64 MiB file), an NBD server on DIR/nbd.sock and
    export 'disk'; returns (daemon, nbd socket path)."""
    d = daemon()
    img = os.path.join(d.dir, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d.qmp.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                              "file": {"driver": "file", "filename": img}})
    sock = os.path.join(d.dir, "nbd.sock")
    args = {"addr": {"type": "unix", "data": {"path": sock}}}
    args.update(server_args or {})
    d.qmp.ok("nbd-server-start", args)
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                  "writable": writable})
    return d, sock


def alive(d, sock):
    """The daemon still answers QMP and serves a fresh NBD client."""
    assert d.qmp.ok("query-block-exports") is not None
    c = RawNBD(sock)
    try:
        size, _flags, _ = c.connect("disk")
        assert size == SIZE
        err, data = c.read(0, 512)
        assert err == 0 and data == b"\0" * 512
    finally:
        c.close()


# ---- QMP ------------------------------------------------------------------------------------

def test_qmp_errors(daemon):
    d = daemon()
    img = os.path.join(d.dir, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    q = d.qmp
    q.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                          "file": {"driver": "file", "filename": img}})
    q.ok("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True})
    sock = os.path.join(d.dir, "nbd.sock")
    assert q.err("nbd-server-stop")["desc"] == "NBD server not running"
    assert q.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk"})["desc"] \
        == "NBD server not running"
    assert q.err("nbd-server-start", {"addr": {"type": "unix", "path": sock}})["desc"] \
        == "Parameter 'addr.data' is missing"
    assert q.err("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                       "max-connections": -1})["desc"] \
        == "Parameter 'max-connections' expects uint32_t"
    assert q.err("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                       "tls-creds": "x"})["desc"] \
        == "No TLS credentials with id 'x'"
    assert q.err("nbd-server-start",
                 {"addr": {"type": "unix", "data": {"path": "/nonexistent/nbd.sock"}}})["desc"] \
        == "Failed to bind socket to /nonexistent/nbd.sock: No such file or directory"
    q.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    assert q.err("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})["desc"] \
        == "NBD server already running"
    add = lambda **kw: q.cmd_args("block-export-add", dict({"type": "nbd"}, **kw))
    assert add(id="e0", **{"node-name": "nope"})["error"]["desc"] \
        == "Cannot find device='' nor node-name='nope'"
    assert add(id="e0")["error"]["desc"] == "Parameter 'node-name' is missing"
    assert add(**{"node-name": "disk"})["error"]["desc"] == "Parameter 'id' is missing"
    assert add(id="#bad", **{"node-name": "disk"})["error"]["desc"] == "Invalid block export id"
    assert add(id="e0", bogus=1, **{"node-name": "disk"})["error"]["desc"] \
        == "Parameter 'bogus' is unexpected"
    assert add(id="e0", iothread="nope", **{"node-name": "disk"})["error"]["desc"] \
        == 'iothread "nope" not found'
    assert add(id="e0", writable=True, **{"node-name": "ro"})["error"]["desc"] \
        == "Cannot export read-only node as writable"
    assert add(id="e0", name="x", **{"node-name": "disk"}) == {"return": {}}
    assert add(id="e0", **{"node-name": "disk"})["error"]["desc"] \
        == "Block export id 'e0' is already in use"
    assert add(id="e1", name="x", **{"node-name": "disk"})["error"]["desc"] \
        == "NBD server already has export named 'x'"
    assert add(id="e1", name="a" * 4097, **{"node-name": "disk"})["error"]["desc"] \
        == "export name '%s' too long" % ("a" * 4097)
    assert add(id="e1", bitmaps=["b0"], **{"node-name": "disk"})["error"]["desc"] \
        == "Bitmap 'b0' is not found"
    assert add(id="e1", description="d", writethrough=True, **{"allow-inactive": True,
               "allocation-depth": True, "fixed-iothread": True, "node-name": "disk",
               "writable": True}) == {"return": {}}
    assert add(id="e2", **{"node-name": "ro"}) == {"return": {}}
    assert q.ok("query-block-exports") == [
        {"type": "nbd", "id": "e2", "node-name": "ro", "shutting-down": False},
        {"type": "nbd", "id": "e1", "node-name": "disk", "shutting-down": False},
        {"type": "nbd", "id": "e0", "node-name": "disk", "shutting-down": False}]
    assert q.err("blockdev-del", {"node-name": "ro"})["desc"] == "Node ro is in use"
    assert q.err("block-export-del", {"id": "zz"})["desc"] == "Export 'zz' is not found"
    assert q.err("block-export-del", {"id": "e0", "mode": "bogus"})["desc"] \
        == "Parameter 'mode' does not accept value 'bogus'"
    q.ok("block-export-del", {"id": "e2"})
    assert q.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e2"}
    q.ok("blockdev-del", {"node-name": "ro"})
    q.ok("nbd-server-stop")
    ids = [q.wait_event("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2)]
    assert ids == ["e1", "e0"]
    assert q.ok("query-block-exports") == []
    assert q.err("nbd-server-stop")["desc"] == "NBD server not running"


def test_command_line_server_and_export(daemon):
    d0 = daemon()
    img = os.path.join(d0.dir, "cl.raw")
    with open(img, "wb") as f:
        f.write(b"\xab" * 4096)
        f.truncate(1 << 20)
    sock = os.path.join(d0.dir, "nbd.sock")
    d = daemon("--blockdev", "driver=file,filename=%s,node-name=f" % img,
               "--blockdev", "raw,file=f,node-name=disk",
               "--nbd-server", "addr.type=unix,addr.path=%s,max-connections=4" % sock,
               "--export", "nbd,id=e0,node-name=disk,name=cl,description=hello")
    assert d.qmp.ok("query-block-exports") == [
        {"type": "nbd", "id": "e0", "node-name": "disk", "shutting-down": False}]
    c = RawNBD(sock)
    c.greeting()
    replies = c.option(nbd_raw.OPT_LIST)
    names = [p[4:4 + struct.unpack(">I", p[:4])[0]] for t, p in replies if t == nbd_raw.REP_SERVER]
    assert names == [b"cl"]
    assert replies[0][1][6:] == b"hello"
    size, flags, infos = c.go("cl", [nbd_raw.INFO_NAME])
    assert size == 1 << 20
    assert flags & nbd_raw.TFLAG_READ_ONLY
    assert infos[nbd_raw.INFO_NAME] == b"cl"
    assert infos[nbd_raw.INFO_DESCRIPTION] == b"hello"
    err, data = c.read(0, 4096)
    assert err == 0 and data == b"\xab" * 4096
    c.close()


# ---- handshake ------------------------------------------------------------------------------

def test_handshake_options(daemon):
    d, sock = start(daemon, writable=False)
    c = RawNBD(sock)
    flags = c.greeting()
    assert flags == 3  # fixed newstyle, no zeroes
    # unknown option: ERR_UNSUP, connection lives
    r = c.option(99)
    assert r[-1][0] == nbd_raw.REP_ERR_UNSUP
    # STARTTLS without TLS configured
    r = c.option(nbd_raw.OPT_STARTTLS)
    assert r[-1] == (nbd_raw.REP_ERR_POLICY, b"TLS not configured")
    # contexts can be listed at any time but selected only with structured replies
    r = c.option(nbd_raw.OPT_LIST_META, RawNBD.meta_payload("disk", []))
    assert r == [(nbd_raw.REP_META_CONTEXT, b"\0\0\0\0base:allocation"), (nbd_raw.REP_ACK, b"")]
    r = c.option(nbd_raw.OPT_SET_META, RawNBD.meta_payload("disk", ["base:allocation"]))
    assert r == [(nbd_raw.REP_ERR_INVALID,
                  b"request option 'set meta context' when structured reply is not negotiated")]
    r = c.option(nbd_raw.OPT_LIST, b"x")
    assert r[-1] == (nbd_raw.REP_ERR_INVALID, b"option 'list' has unexpected length")
    c.structured_reply()
    r = c.option(nbd_raw.OPT_STRUCTURED_REPLY)
    assert r[-1] == (nbd_raw.REP_ERR_INVALID, b"structured reply already negotiated")
    r = c.option(nbd_raw.OPT_LIST_META, RawNBD.meta_payload("disk", []))
    assert [p[4:] for t, p in r if t == nbd_raw.REP_META_CONTEXT] == [b"base:allocation"]
    r = c.option(nbd_raw.OPT_LIST_META, RawNBD.meta_payload("nope", []))
    assert r[-1] == (nbd_raw.REP_ERR_UNKNOWN, b"export 'nope' not present")
    # INFO does not end negotiation; GO does
    r = c.option(nbd_raw.OPT_INFO, RawNBD.info_payload("disk", [nbd_raw.INFO_BLOCK_SIZE]))
    assert r[-1][0] == nbd_raw.REP_ACK
    blk = [p for t, p in r if t == nbd_raw.REP_INFO and p[:2] == b"\0\3"][0]
    assert struct.unpack(">HIII", blk) == (3, 1, 4096, MAX)
    r = c.option(nbd_raw.OPT_INFO, RawNBD.info_payload("disk", [1, 2]) + b"x")
    assert r[-1] == (nbd_raw.REP_ERR_INVALID, b"option 'info' has unexpected length")
    r = c.option(nbd_raw.OPT_INFO, RawNBD.info_payload("disk", [1, 2])[:-2])
    assert r[-1] == (nbd_raw.REP_ERR_INVALID, b"Inconsistent lengths in option info")
    r = c.option(nbd_raw.OPT_LIST_META, struct.pack(">I", 4) + b"disk")
    assert r[-1] == (nbd_raw.REP_ERR_INVALID, b"Inconsistent lengths in option list meta context")
    size, flags, _ = c.go("disk")
    assert size == SIZE
    assert flags & nbd_raw.TFLAG_READ_ONLY
    assert not flags & (nbd_raw.TFLAG_SEND_TRIM | nbd_raw.TFLAG_SEND_WRITE_ZEROES)
    assert flags & nbd_raw.TFLAG_CAN_MULTI_CONN
    c.disconnect()
    assert c.is_closed()
    c.close()
    # ABORT: ACK, then the server closes
    c = RawNBD(sock)
    c.greeting()
    assert c.option(nbd_raw.OPT_ABORT)[-1][0] == nbd_raw.REP_ACK
    assert c.is_closed()
    c.close()
    # EXPORT_NAME: size and flags, then transmission (no zero padding with NO_ZEROES)
    c = RawNBD(sock)
    c.greeting()
    c.send_option(nbd_raw.OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv_exact(10))
    assert size == SIZE and flags & nbd_raw.TFLAG_READ_ONLY
    err, data = c.read(0, 4096)
    assert err == 0 and data == b"\0" * 4096
    c.close()
    # EXPORT_NAME of a missing export: the only answer is a disconnect
    c = RawNBD(sock)
    c.greeting()
    c.send_option(nbd_raw.OPT_EXPORT_NAME, b"nope")
    assert c.is_closed()
    c.close()
    alive(d, sock)


@pytest.mark.parametrize("length", [256, 257, 4096, 4097, 0xFFFFFFFF])
def test_go_name_lengths(daemon, length):
    """CVE-2017-15118 / CVE-2020-10761 / CVE-2022-26495: every name length is refused cleanly
    and reply strings stay under 4096 bytes."""
    d, sock = start(daemon)
    c = RawNBD(sock)
    c.greeting()
    if length <= 4097:
        payload = RawNBD.info_payload("a" * length)
    else:
        payload = struct.pack(">I", length) + b"a" * 16 + b"\0\0"
    replies = c.option(nbd_raw.OPT_GO, payload)
    rtype, message = replies[-1]
    assert len(message) < 4096
    if length <= 4096:
        assert rtype == nbd_raw.REP_ERR_UNKNOWN
        shown = "a" * min(length, 80) + ("..." if length > 80 else "")
        assert message == ("export '%s' not present" % shown).encode()
    else:
        assert rtype == nbd_raw.REP_ERR_INVALID
        assert message == ("Invalid name length: %d" % length).encode()
    c.close()
    alive(d, sock)


def test_option_too_long_disconnects(daemon):
    """CVE-2017-15119: an option longer than 32 MiB ends the connection without reading it."""
    d, sock = start(daemon)
    c = RawNBD(sock)
    c.greeting()
    c.send_option(nbd_raw.OPT_LIST, b"", length=MAX + 1)
    assert c.is_closed()
    c.close()
    alive(d, sock)


def test_bad_client_flags_and_magic(daemon):
    d, sock = start(daemon)
    c = RawNBD(sock)
    c.greeting(client_flags=0x80)
    assert c.is_closed()
    c.close()
    c = RawNBD(sock)
    c.greeting()
    c.send(struct.pack(">QII", 0x1234, nbd_raw.OPT_LIST, 0))
    assert c.is_closed()
    c.close()
    alive(d, sock)


def test_truncated_handshakes(daemon):
    """CVE-2017-9524: clients that send a few bytes and vanish leave the server serving."""
    d, sock = start(daemon)
    prefix = struct.pack(">IQII", 3, nbd_raw.OPT_MAGIC, nbd_raw.OPT_GO, 10) + b"\0\0\0\4disk"
    for n in range(len(prefix) + 1):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        s.sendall(prefix[:n])
        s.close()
    alive(d, sock)


def test_handshake_max_seconds(daemon):
    d, sock = start(daemon, server_args={"handshake-max-seconds": 1})
    c = RawNBD(sock)
    c.greeting()
    t0 = time.monotonic()
    assert c.is_closed(timeout=5.0)
    assert time.monotonic() - t0 < 3.0
    c.close()
    # a client that finished the handshake is not dropped
    c = RawNBD(sock)
    c.connect("disk")
    time.sleep(1.5)
    err, _ = c.read(0, 512)
    assert err == 0
    c.close()


def test_max_connections(daemon):
    d, sock = start(daemon, server_args={"max-connections": 1})
    first = RawNBD(sock)
    _size, flags, _ = first.connect("disk")
    assert not flags & nbd_raw.TFLAG_CAN_MULTI_CONN  # max-connections=1 disables multi-conn
    second = RawNBD(sock, timeout=1.0)
    with pytest.raises(socket.timeout):
        second.recv_exact(1)
    first.close()
    second.sock.settimeout(5.0)
    second.greeting()
    size, _flags, _ = second.go("disk")
    assert size == SIZE
    second.close()


# ---- transmission limits --------------------------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_request_limits(daemon, structured):
    d, sock = start(daemon)
    c = RawNBD(sock, timeout=30)
    c.connect("disk", structured=structured)
    err, data = c.read(0, MAX)
    assert err == 0 and len(data) == MAX
    assert c.read(0, MAX + 1)[0] == nbd_raw.EINVAL  # connection lives
    assert c.read(SIZE - 512, 1024)[0] == nbd_raw.EINVAL  # past EOF
    assert c.read((1 << 64) - 512, 1024)[0] == nbd_raw.EINVAL  # offset + length overflows
    assert c.command(nbd_raw.CMD_TRIM, SIZE - 512, 1024) == nbd_raw.EINVAL
    assert c.command(nbd_raw.CMD_WRITE_ZEROES, (1 << 64) - 512, 1024) == nbd_raw.EINVAL
    assert c.command(nbd_raw.CMD_FLUSH) == 0
    if structured:
        c.send_request(nbd_raw.CMD_READ, 0, 0)
        assert c.recv_simple_or_chunks() == (0, [(nbd_raw.CHUNK_NONE, nbd_raw.REPLY_FLAG_DONE, b"")])
    assert c.command(nbd_raw.CMD_CACHE, 0, MAX + 1) == nbd_raw.EINVAL
    assert c.command(nbd_raw.CMD_CACHE, 0, 4096) == 0
    assert c.command(99) == nbd_raw.EINVAL
    err, data = c.read(0, 512)
    assert err == 0
    # an oversized WRITE: error, then the server drops the connection (payload not consumed)
    c.send_request(nbd_raw.CMD_WRITE, 0, MAX + 1)
    error, _ = c.recv_simple_or_chunks()
    assert error == nbd_raw.EINVAL
    assert c.is_closed()
    c.close()
    alive(d, sock)


def test_read_only_export_refuses_writes(daemon):
    """The spec says SHOULD EPERM; QEMU answers EINVAL ("Export is read-only"). strata: EPERM."""
    d, sock = start(daemon, writable=False)
    c = RawNBD(sock)
    c.connect("disk")
    allowed = (nbd_raw.EPERM,) if daemon.impl.name == "strata" else (nbd_raw.EPERM, nbd_raw.EINVAL)
    assert c.write(0, b"x" * 512) in allowed
    assert c.command(nbd_raw.CMD_TRIM, 0, 4096) in allowed
    assert c.command(nbd_raw.CMD_WRITE_ZEROES, 0, 4096) in allowed
    err, data = c.read(0, 512)
    assert err == 0 and data == b"\0" * 512
    c.close()


def test_write_read_zero_and_status(daemon):
    d, sock = start(daemon)
    c = RawNBD(sock)
    _size, flags, contexts = c.connect("disk", meta=["base:allocation"])
    assert contexts == {"base:allocation": 0}
    assert flags & nbd_raw.TFLAG_SEND_WRITE_ZEROES
    pattern = bytes(range(256)) * 256  # 64 KiB
    assert c.write(1 << 20, pattern, nbd_raw.FLAG_FUA) == 0
    err, data = c.read(1 << 20, len(pattern))
    assert err == 0 and data == pattern
    # a sparse read: hole chunks around the data
    c.send_request(nbd_raw.CMD_READ, (1 << 20) - 65536, 3 * 65536)
    err, chunks = c.recv_simple_or_chunks()
    assert err == 0
    types = [t for t, _f, _p in chunks]
    assert nbd_raw.CHUNK_HOLE in types and nbd_raw.CHUNK_DATA in types
    err, status = c.block_status(0, 4 << 20)
    assert err == 0
    ext = status[0]
    assert sum(length for length, _ in ext) <= 4 << 20
    assert ext[0][1] == 3 and ext[0][0] == 1 << 20  # hole,zero up to the data
    err, status = c.block_status(0, 4 << 20, nbd_raw.FLAG_REQ_ONE)
    assert err == 0 and len(status[0]) == 1
    assert c.command(nbd_raw.CMD_WRITE_ZEROES, 1 << 20, 4096) == 0
    err, data = c.read(1 << 20, 8192)
    assert data == b"\0" * 4096 + pattern[4096:8192]
    assert c.command(nbd_raw.CMD_WRITE_ZEROES, 1 << 20, 4096, nbd_raw.FLAG_NO_HOLE) == 0
    assert c.command(nbd_raw.CMD_TRIM, 0, 4096, nbd_raw.FLAG_FUA) == 0
    assert c.block_status(0, 0)[0] == nbd_raw.EINVAL
    c.close()


def test_pipelined_requests(daemon):
    """Many requests in flight on one connection: every reply arrives, matched by cookie."""
    d, sock = start(daemon)
    c = RawNBD(sock, timeout=30)
    c.connect("disk")
    n = 100
    for i in range(n):
        c.send_request(nbd_raw.CMD_WRITE, i * 4096, 4096, 0, bytes([i]) * 4096)
    for i in range(n):
        assert c.recv_simple_or_chunks()[0] == 0
    for i in range(n):
        err, data = c.read(i * 4096, 4096)
        assert data == bytes([i]) * 4096
    c.close()


# ---- lifecycle with clients connected -------------------------------------------------------

def test_export_del_with_clients(daemon):
    d, sock = start(daemon)
    img2 = os.path.join(d.dir, "other.raw")
    with open(img2, "wb") as f:
        f.truncate(SIZE)
    d.qmp.ok("blockdev-add", {"driver": "raw", "node-name": "other",
                              "file": {"driver": "file", "filename": img2}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "other", "node-name": "other",
                                  "writable": True})
    victim = RawNBD(sock)
    victim.connect("disk")
    bystander = RawNBD(sock)
    bystander.connect("other")
    assert d.qmp.err("block-export-del", {"id": "disk"})["desc"] == "export 'disk' still in use"
    # requests in flight while the export goes away
    for i in range(16):
        victim.send_request(nbd_raw.CMD_WRITE, i * 65536, 65536, 0, b"v" * 65536)
    d.qmp.ok("block-export-del", {"id": "disk", "mode": "hard"})
    assert d.qmp.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "disk"}
    deadline = time.monotonic() + 5
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            victim.recv_simple_or_chunks()
        except (nbd_raw.Closed, ConnectionResetError, socket.timeout):
            closed = True
    assert closed
    victim.close()
    assert bystander.write(0, b"b" * 512) == 0
    assert bystander.read(0, 512) == (0, b"b" * 512)
    assert d.qmp.ok("query-block-exports") == [
        {"type": "nbd", "id": "other", "node-name": "other", "shutting-down": False}]
    d.qmp.ok("blockdev-del", {"node-name": "disk"})
    bystander.close()


def test_server_stop_with_clients(daemon):
    d, sock = start(daemon)
    negotiated = RawNBD(sock)
    negotiated.connect("disk")
    for i in range(8):
        negotiated.send_request(nbd_raw.CMD_READ, i * (1 << 20), 1 << 20)
    half = RawNBD(sock)
    half.greeting()
    d.qmp.ok("nbd-server-stop")
    assert d.qmp.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "disk"}
    assert half.is_closed()
    try:
        while True:
            negotiated.recv_simple_or_chunks(1 << 20)
    except (nbd_raw.Closed, ConnectionResetError, socket.timeout):
        pass
    assert d.qmp.ok("query-block-exports") == []
    # start again on the same path
    d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk"})
    alive(d, sock)


def test_stop_start_race_with_listing_clients(daemon):
    """CVE-2024-7409 shape: server start/stop in a loop while clients connect and list."""
    d, sock = start(daemon)
    stop = threading.Event()

    def lister():
        while not stop.is_set():
            try:
                c = RawNBD(sock, timeout=2)
                c.greeting()
                c.option(nbd_raw.OPT_LIST)
                c.close()
            except (OSError, nbd_raw.Closed, AssertionError, struct.error):
                time.sleep(0.01)

    threads = [threading.Thread(target=lister) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            d.qmp.ok("nbd-server-stop")
            d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            d.qmp.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk"})
    finally:
        stop.set()
        for t in threads:
            t.join()
    alive(d, sock)


# ---- the embedded default of `strata daemon` ------------------------------------------------

def test_strata_default_exports_disk(workdir):
    """`strata daemon` without options exports node 'disk' over strata-data/nbd.sock (and
    127.0.0.1:10809 when that port is free)."""
    impl = _resolve_impl("strata")
    proc = subprocess.Popen(impl.argv, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sock = os.path.join(workdir, "strata-data", "nbd.sock")
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no NBD socket"
            time.sleep(0.05)
        c = RawNBD(sock)
        size, flags, _ = c.connect("disk")
        assert size == 1 << 30
        assert not flags & nbd_raw.TFLAG_READ_ONLY
        assert c.write(0, b"d" * 4096) == 0
        assert c.read(0, 4096) == (0, b"d" * 4096)
        c.close()
        tcp_listening = True
        try:
            probe = socket.create_connection(("127.0.0.1", 10809), timeout=2)
            probe.close()
        except OSError:
            tcp_listening = False
        if tcp_listening:
            c = RawNBD(address=("127.0.0.1", 10809))
            size, _flags, _ = c.connect("disk")
            assert size == 1 << 30
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "nbd+unix:///disk?socket=strata-data/nbd.sock" in out
    assert "AddressSanitizer" not in err


def test_extended_headers(daemon):
    d, sock = start(daemon)
    c = RawNBD(sock)
    c.greeting()
    assert c.extended_headers()[-1][0] == nbd_raw.REP_ACK
    r = c.option(nbd_raw.OPT_STRUCTURED_REPLY)
    assert r[-1] == (nbd_raw.REP_ERR | 10, b"extended headers already negotiated")
    contexts, _ = c.set_meta("disk", ["base:allocation"])
    assert contexts == {"base:allocation": 0}
    _size, flags, _ = c.go("disk")
    assert flags & (1 << 12)  # NBD_FLAG_BLOCK_STAT_PAYLOAD
    assert c.write(65536, b"x" * 4096) == 0
    err, data = c.read(65536, 8192)
    assert err == 0 and data == b"x" * 4096 + b"\0" * 4096
    c.send_request(nbd_raw.CMD_BLOCK_STATUS, 0, 1 << 20)
    err, chunks = c.recv_simple_or_chunks()
    assert err == 0 and len(chunks) == 1
    ctype, cflags, payload = chunks[0]
    assert ctype == 6 and cflags & nbd_raw.REPLY_FLAG_DONE  # BLOCK_STATUS_EXT
    cid, count = struct.unpack(">II", payload[:8])
    ext = [struct.unpack(">QQ", payload[8 + 16 * i:24 + 16 * i]) for i in range(count)]
    assert cid == 0 and len(payload) == 8 + 16 * count
    assert ext[0] == (65536, 3)
    assert sum(length for length, _ in ext) <= 1 << 20
    # block status with a payload naming the context
    c.send_request(nbd_raw.CMD_BLOCK_STATUS, 0, 12, 32 | nbd_raw.FLAG_REQ_ONE,
                   struct.pack(">QI", 65536, 0))
    err, chunks = c.recv_simple_or_chunks()
    assert err == 0
    cid, count = struct.unpack(">II", chunks[0][2][:8])
    assert (cid, count) == (0, 1)
    assert struct.unpack(">QQ", chunks[0][2][8:24]) == (65536, 3)
    assert c.command(nbd_raw.CMD_FLUSH) == 0
    c.close()
