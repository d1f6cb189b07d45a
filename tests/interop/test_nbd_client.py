"""strata's NBD client (driver `nbd`, nbd:// URIs in `strata img`/`strata io`) against real
servers: qemu-nbd, qemu-storage-daemon and nbdkit; compared with qemu-img/qemu-io over the same
URIs. Also a fake server that breaks the protocol, and reconnect-delay through a daemon chain.
"""

import json
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import REPO, Daemon, _resolve_impl, need_tool, run_tool

SIZE = 16 << 20
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def strata_bin():
    binary = os.environ.get("STRATA_BIN") or str(REPO / "build" / "strata")
    if not os.path.exists(binary):
        pytest.skip("strata binary %s does not exist (build it or set STRATA_BIN)" % binary)
    return binary


def strata(*args, timeout=120):
    r = subprocess.run([strata_bin()] + list(args), capture_output=True, text=True,
                       timeout=timeout)
    for marker in SANITIZER_MARKERS:
        assert marker not in r.stderr, r.stderr
    return r


def make_image(path):
    """Data at 0 (64 KiB of 0x11) and 8 MiB (1 MiB of 0x22); holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(b"\x11" * 65536)
        f.seek(8 << 20)
        f.write(b"\x22" * (1 << 20))


def wait_for_socket(path, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("server exited early: %s" % proc.stderr.read())
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise AssertionError("socket %s did not appear" % path)


class Server:
    """One NBD server process serving export 'exp' on a unix socket."""

    def __init__(self, argv, sock):
        self.sock = sock
        self.argv = argv
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        wait_for_socket(self.sock, self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if os.path.exists(self.sock):
            os.unlink(self.sock)

    @property
    def uri(self):
        return "nbd+unix:///exp?socket=%s" % self.sock


def server_argv(kind, image, sock, read_only=False):
    if kind == "qemu-nbd":
        need_tool("qemu-nbd")
        return (["qemu-nbd", "-t", "-f", "raw", "-x", "exp", "-k", sock] +
                (["-r"] if read_only else []) + [image])
    if kind == "qsd":
        need_tool("qemu-storage-daemon")
        return ["qemu-storage-daemon",
                "--blockdev", "driver=file,filename=%s,node-name=f" % image,
                "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                "--export", "nbd,id=e,node-name=f,name=exp,writable=%s"
                % ("off" if read_only else "on")]
    if kind == "nbdkit":
        need_tool("nbdkit")
        return (["nbdkit", "-f", "-U", sock] + (["-r"] if read_only else []) +
                ["file", "file=%s" % image])
    raise AssertionError(kind)


@pytest.fixture
def image(workdir):
    path = os.path.join(workdir, "disk.raw")
    make_image(path)
    return path


@pytest.fixture(params=["qemu-nbd", "qsd", "nbdkit"])
def server(request, workdir, image):
    s = Server(server_argv(request.param, image, os.path.join(workdir, "nbd.sock")),
               os.path.join(workdir, "nbd.sock"))
    s.kind = request.param
    s.image = image
    yield s
    s.stop()


# -- data -------------------------------------------------------------------------------------

def test_read_back_equals_the_image(server):
    r = strata("img", "compare", "-U", server.uri, server.image)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Images are identical.\n"
    r = strata("io", "-f", "raw", "-c", "read -P 0x22 8M 1M", "-c", "read -P 0 1M 64k", server.uri)
    assert r.returncode == 0, r.stderr
    assert "Pattern verification failed" not in r.stdout + r.stderr


def test_writes_are_visible_to_the_server(server):
    r = strata("io", "-f", "raw", "-c", "write -P 0x5a 2M 192k", "-c", "write -z 8M 64k",
               "-c", "flush", server.uri)
    assert r.returncode == 0, r.stderr
    with open(server.image, "rb") as f:
        f.seek(2 << 20)
        assert f.read(192 << 10) == b"\x5a" * (192 << 10)
        f.seek(8 << 20)
        assert f.read(65536) == bytes(65536)
        assert f.read(65536) == b"\x22" * 65536


def test_large_requests_are_split(server):
    """A 40 MiB-capable read through strata's client: requests over 32 MiB are split."""
    r = strata("io", "-f", "raw", "-c", "write -P 0x77 0 16M", "-c", "read -P 0x77 0 16M",
               server.uri)
    assert r.returncode == 0, r.stderr
    assert "Pattern verification failed" not in r.stdout + r.stderr


def test_map_equals_qemu_img_map(server):
    need_tool("qemu-img")
    for fmt in ("json", "human"):
        ours = strata("img", "map", "--output=" + fmt, server.uri)
        theirs = run_tool("qemu-img", "map", "--output=" + fmt, server.uri)
        assert theirs.returncode == 0, theirs.stderr
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout


def test_convert_equals_qemu_img_convert(server, workdir):
    need_tool("qemu-img")
    ours = os.path.join(workdir, "ours.raw")
    theirs = os.path.join(workdir, "theirs.raw")
    r = strata("img", "convert", "-O", "raw", server.uri, ours)
    assert r.returncode == 0, r.stderr
    r = run_tool("qemu-img", "convert", "-O", "raw", server.uri, theirs)
    assert r.returncode == 0, r.stderr
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


def test_convert_into_an_export_with_n(server, workdir):
    src = os.path.join(workdir, "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(4 << 20)
        f.write(b"\x66" * (3 << 20))
    r = strata("img", "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri)
    assert r.returncode == 0, r.stderr
    r = strata("img", "compare", "-f", "raw", "-F", "raw", src, server.uri)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(server.image, "rb") as f:
        assert f.read() == open(src, "rb").read()


def test_create_and_convert_onto_an_export_as_qemu(server, workdir):
    """NBD cannot create images: create/convert without -n open the export instead (QEMU's
    create fallback), refusing a size larger than the export."""
    need_tool("qemu-img")
    compare_errors(["create", "-f", "raw", server.uri, str(SIZE * 2)])
    compare_errors(["create", "-f", "raw", "-o", "preallocation=full", server.uri, "1M"])
    big = os.path.join(workdir, "big.raw")
    with open(big, "wb") as f:
        f.truncate(SIZE * 2)
    compare_errors(["convert", "-O", "raw", big, server.uri])
    r = strata("img", "create", "-f", "raw", server.uri, str(SIZE))
    assert r.returncode == 0, r.stderr
    with open(server.image, "rb") as f:
        assert f.read(512) == bytes(512)
    src = os.path.join(workdir, "src.raw")
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(b"\x5b" * 65536)
    r = strata("img", "convert", "-O", "raw", src, server.uri)
    assert r.returncode == 0, r.stderr
    with open(server.image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5b" * 65536


def test_info_equals_qemu_img_info(server):
    need_tool("qemu-img")
    ours = strata("img", "info", "--output=json", server.uri)
    theirs = run_tool("qemu-img", "info", "--output=json", server.uri)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == json.loads(theirs.stdout)
    ours = strata("img", "info", server.uri)
    theirs = run_tool("qemu-img", "info", server.uri)
    assert ours.stdout == theirs.stdout


def test_check_is_refused_as_qemu_img_does(server):
    need_tool("qemu-img")
    ours = strata("img", "check", server.uri)
    theirs = run_tool("qemu-img", "check", server.uri)
    assert ours.returncode == theirs.returncode == 63
    assert ours.stderr.replace("strata img:", "qemu-img:") == theirs.stderr


def test_qcow2_inside_an_export_is_probed(workdir):
    need_tool("qemu-nbd")
    qcow2 = os.path.join(workdir, "img.qcow2")
    r = run_tool("qemu-img", "create", "-q", "-f", "qcow2", qcow2, "4M")
    assert r.returncode == 0, r.stderr
    r = run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x31 1M 64k", qcow2)
    assert r.returncode == 0, r.stderr
    sock = os.path.join(workdir, "q.sock")
    s = Server(["qemu-nbd", "-t", "-f", "raw", "-x", "exp", "-k", sock, qcow2], sock)
    try:
        ours = strata("img", "info", "--output=json", s.uri)
        theirs = run_tool("qemu-img", "info", "--output=json", s.uri)
        assert ours.returncode == 0, ours.stderr
        assert json.loads(ours.stdout)["format"] == "qcow2"
        assert json.loads(ours.stdout)["virtual-size"] == json.loads(theirs.stdout)["virtual-size"]
        r = strata("io", "-c", "read -P 0x31 1M 64k", s.uri)
        assert r.returncode == 0, r.stderr
        assert "Pattern verification failed" not in r.stdout
    finally:
        s.stop()


def test_nbdkit_memory_round_trip(workdir):
    need_tool("nbdkit")
    need_tool("qemu-io")
    sock = os.path.join(workdir, "m.sock")
    s = Server(["nbdkit", "-f", "-U", sock, "memory", "32M"], sock)
    try:
        r = strata("io", "-f", "raw", "-c", "write -P 0x42 1M 1M", s.uri)
        assert r.returncode == 0, r.stderr
        r = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0x42 1M 1M", s.uri)
        assert r.returncode == 0, r.stderr
        assert "Pattern verification failed" not in r.stdout
        ours = strata("img", "map", "--output=json", "-f", "raw", s.uri)
        theirs = run_tool("qemu-img", "map", "--output=json", "-f", "raw", s.uri)
        assert ours.stdout == theirs.stdout
    finally:
        s.stop()


def test_image_opts_with_inet_server(workdir, image):
    need_tool("qemu-nbd")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-x", "exp", "-b", "127.0.0.1",
                             "-p", str(port), image], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "qemu-nbd did not listen"
                time.sleep(0.05)
        uri = "nbd://127.0.0.1:%d/exp" % port
        r = strata("img", "compare", "-U", "-F", "raw", uri, image)
        assert r.returncode == 0, r.stderr
        opts = ("driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
                "file.server.port=%d,file.export=exp" % port)
        r = strata("io", "--image-opts", "-c", "read -P 0x11 0 64k", opts)
        assert r.returncode == 0, r.stderr
        assert "Pattern verification failed" not in r.stdout
        r = strata("img", "info", "--output=json", uri)
        assert json.loads(r.stdout)["filename"] == uri
    finally:
        proc.kill()
        proc.wait()


def test_read_only_export(workdir, image):
    need_tool("qemu-nbd")
    sock = os.path.join(workdir, "ro.sock")
    s = Server(server_argv("qemu-nbd", image, sock, read_only=True), sock)
    try:
        r = strata("io", "-r", "-f", "raw", "-c", "read -P 0x11 0 64k", s.uri)
        assert r.returncode == 0, r.stderr
        ours = strata("io", "-f", "raw", "-c", "write 0 512", s.uri)
        theirs = run_tool("qemu-io", "-f", "raw", "-c", "write 0 512", s.uri)
        assert ours.stdout + ours.stderr.replace("strata io:", "qemu-io:") == \
            theirs.stdout + theirs.stderr
        assert ours.returncode == theirs.returncode
    finally:
        s.stop()


def test_x_dirty_bitmap_map_as_qemu(workdir):
    """x-dirty-bitmap selects qemu:dirty-bitmap:NAME for block status: dirty areas read as
    holes in `img map`, as with qemu-img. strata's map reports unallocated areas of any driver
    as zero, qemu-img only for drivers with backing files: "zero" is compared elsewhere only."""
    need_tool("qemu-nbd")
    qcow2 = os.path.join(workdir, "b.qcow2")
    for args in (["create", "-q", "-f", "qcow2", qcow2, "4M"], ["bitmap", "--add", qcow2, "b0"]):
        r = run_tool("qemu-img", *args)
        assert r.returncode == 0, r.stderr
    r = run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", qcow2)
    assert r.returncode == 0, r.stderr
    sock = os.path.join(workdir, "b.sock")
    s = Server(["qemu-nbd", "-t", "-f", "qcow2", "-x", "exp", "-B", "b0", "-k", sock, qcow2], sock)
    try:
        opts = ("driver=nbd,server.type=unix,server.path=%s,export=exp,"
                "x-dirty-bitmap=qemu:dirty-bitmap:b0" % sock)
        ours = strata("img", "map", "--output=json", "--image-opts", opts)
        theirs = run_tool("qemu-img", "map", "--output=json", "--image-opts", opts)
        assert ours.returncode == 0, ours.stderr
        ours_map = json.loads(ours.stdout)
        theirs_map = json.loads(theirs.stdout)
        assert [e["start"] for e in ours_map] == [0, 1 << 20, (1 << 20) + 65536]
        for entry in ours_map + theirs_map:
            if not entry["present"]:
                entry.pop("zero")
        assert ours_map == theirs_map
        compare_errors(["map", "--image-opts", opts + "x"])
    finally:
        s.stop()


# -- errors -----------------------------------------------------------------------------------

def compare_errors(args, tool="img"):
    need_tool("qemu-img")
    ours = strata(tool, *args)
    theirs = run_tool("qemu-img" if tool == "img" else "qemu-io", *args)
    assert ours.returncode == theirs.returncode
    prefix = "strata %s:" % tool
    # QEMU 10 also prints a GLib assertion for some malformed URIs; it is not part of the error.
    theirs_lines = [line for line in theirs.stderr.splitlines(True) if "GLib:" not in line]
    assert ours.stderr.replace(prefix, "qemu-img:" if tool == "img" else "qemu-io:") == \
        "".join(theirs_lines)


def test_unknown_export_error_equals_qemu(server):
    if server.kind == "nbdkit":
        pytest.skip("nbdkit serves every export name")
    compare_errors(["info", server.uri.replace("///exp", "///nope")])


def test_connection_errors_equal_qemu(workdir):
    compare_errors(["info", "nbd+unix:///x?socket=%s/none.sock" % workdir])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    compare_errors(["info", "nbd://127.0.0.1:%d/x" % port])


@pytest.mark.parametrize("uri", ["nbd://127.0.0.1/x?foo=bar", "nbd+unix:///x",
                                 "nbd+unix://host/x?socket=/s", "nbd:///x",
                                 "nbd+unix:///x?socket=/a&foo=b", "nbd://127.0.0.1:99999/x",
                                 "nbd+unix:///x?socket=/none/a&socket=/none/b"])
def test_malformed_uris_equal_qemu(uri):
    compare_errors(["info", uri])


def test_nbds_and_unknown_tls_creds_are_refused_clearly(workdir):
    r = strata("img", "info", "nbds://127.0.0.1/x")
    assert r.returncode == 1
    assert "nbds:// needs tls-certificates=DIR (x509) or tls-psk-file=FILE (PSK)" in r.stderr
    r = strata("img", "info", "nbd://127.0.0.1/x?tls-certificates=/")
    assert r.returncode == 1
    assert "No valid URL specified" in r.stderr
    # qemu-io's words for credentials that were never created.
    r = strata("io", "--image-opts", "-c", "read 0 1",
               "driver=nbd,server.type=unix,server.path=%s/s,tls-creds=tls0" % workdir)
    assert r.returncode == 1
    assert r.stderr == "strata io: can't open: No TLS credentials with id 'tls0'\n"


# -- a server that breaks the protocol --------------------------------------------------------

class FakeServer:
    """Answers the handshake properly, then replies to the first request with `bad_reply`
    (bytes, built from the request's cookie, offset and length) and keeps the socket open."""

    def __init__(self, sock, bad_reply):
        self.sock_path = sock
        self.bad_reply = bad_reply
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.stop = threading.Event()
        self.thread.start()

    def recv_exact(self, conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def option_reply(self, opt, rtype, data=b""):
        return struct.pack(">QIII", 0x0003e889045565a9, opt, rtype, len(data)) + data

    def serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                self.handle(conn)
            except (EOFError, OSError):
                pass
            finally:
                conn.close()

    def handle(self, conn):
        conn.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
        self.recv_exact(conn, 4)
        while True:
            _magic, opt, length = struct.unpack(">QII", self.recv_exact(conn, 16))
            self.recv_exact(conn, length)
            if opt == 8:  # structured reply
                conn.sendall(self.option_reply(opt, 1))
            elif opt == 10:  # set meta context
                conn.sendall(self.option_reply(opt, 4, struct.pack(">I", 1) + b"base:allocation"))
                conn.sendall(self.option_reply(opt, 1))
            elif opt == 7:  # go
                conn.sendall(self.option_reply(opt, 3, struct.pack(">HQH", 0, 1 << 20, 1 | 4)))
                conn.sendall(self.option_reply(opt, 1))
                break
            else:
                conn.sendall(self.option_reply(opt, (1 << 31) | 1))
        while True:
            _magic, _flags, cmd, cookie, offset, length = struct.unpack(
                ">IHHQQI", self.recv_exact(conn, 28))
            if cmd == 2:
                return
            if cmd == 1:
                self.recv_exact(conn, length)
            conn.sendall(self.bad_reply(cmd, cookie, offset, length))
            if self.stop.wait(0):
                return

    def close(self):
        self.stop.set()
        self.listener.close()


def structured(flags, rtype, cookie, payload):
    return struct.pack(">IHHQI", 0x668e33ef, flags, rtype, cookie, len(payload)) + payload


BAD_REPLIES = {
    "wrong-cookie": (lambda cmd, cookie, off, ln:
                     structured(1, 1, cookie + 1000, struct.pack(">Q", off) + b"x" * ln),
                     "unknown cookie"),
    "chunk-past-request": (lambda cmd, cookie, off, ln:
                           structured(1, 1, cookie, struct.pack(">Q", off + 512) + b"x" * ln),
                           "exceeding requested region"),
    "oversized-length": (lambda cmd, cookie, off, ln:
                         struct.pack(">IHHQI", 0x668e33ef, 1, 1, cookie, 0xfffffff0),
                         "invalid payload length"),
    "bad-magic": (lambda cmd, cookie, off, ln: b"\xde\xad\xbe\xef" + b"\0" * 12,
                  "invalid reply magic"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_hostile_server_gives_a_clean_error(workdir, case):
    reply, message = BAD_REPLIES[case]
    sock = os.path.join(workdir, "bad.sock")
    fake = FakeServer(sock, reply)
    try:
        r = strata("io", "-f", "raw", "-c", "read 0 4096",
                   "nbd+unix:///?socket=%s" % sock, timeout=60)
        assert r.returncode != 0 or "read failed" in r.stderr, r.stdout + r.stderr
        assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        assert message in r.stderr, r.stderr
    finally:
        fake.close()


# -- reconnect --------------------------------------------------------------------------------

@pytest.fixture(params=["strata", "qsd"])
def chain_impl(request):
    return _resolve_impl(request.param)


def start_chain(impl, workdir, upstream_sock, delay, index=0):
    """A daemon whose node `n` is an NBD client of `upstream_sock`, exported again on
    d<index>/e.sock; qemu-io reaches the upstream server through it."""
    d = Daemon(impl, workdir, index, [
        "--blockdev", "driver=nbd,node-name=n,server.type=unix,server.path=%s,export=exp,"
        "reconnect-delay=%d" % (upstream_sock, delay),
        "--nbd-server", "addr.type=unix,addr.path=%s" % os.path.join(workdir, "e%d.sock" % index),
        "--export", "nbd,id=e,node-name=n,name=e,writable=on"])
    d.connect()
    d.negotiate()
    return d, "nbd+unix:///e?socket=%s" % os.path.join(workdir, "e%d.sock" % index)


def test_reconnect_within_delay_succeeds(chain_impl, workdir, image):
    need_tool("nbdkit")
    need_tool("qemu-io")
    sock = os.path.join(workdir, "up.sock")
    upstream = Server(["nbdkit", "-f", "-U", sock, "--exportname=exp", "file",
                       "file=%s" % image], sock)
    d, uri = start_chain(chain_impl, workdir, sock, delay=60)
    try:
        r = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", uri)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        upstream.stop()
        # The request is sent while the upstream server is gone; it waits for the reconnect.
        reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 0x22 8M 64k", uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert reader.poll() is None, reader.communicate()
        upstream.start()
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, out + err
        assert "read 65536/65536 bytes" in out and "verification failed" not in out, out + err
    finally:
        problems = d.stop()
        upstream.stop()
    assert not problems, problems


def test_requests_fail_after_the_delay(chain_impl, workdir, image):
    need_tool("nbdkit")
    need_tool("qemu-io")
    sock = os.path.join(workdir, "up.sock")
    upstream = Server(["nbdkit", "-f", "-U", sock, "--exportname=exp", "file",
                       "file=%s" % image], sock)
    d, uri = start_chain(chain_impl, workdir, sock, delay=1)
    try:
        r = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", uri)
        assert r.returncode == 0, r.stdout + r.stderr
        upstream.stop()
        r = run_tool("qemu-io", "-f", "raw", "-c", "read 0 64k", uri, timeout=60)
        assert "read failed: Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        # The client keeps reconnecting in the background: once the server is back, requests
        # work again.
        upstream.start()
        deadline = time.monotonic() + 30
        while True:
            r = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", uri)
            if r.returncode == 0 and "failed" not in r.stdout + r.stderr:
                break
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(0.2)
    finally:
        problems = d.stop()
        upstream.stop()
    assert not problems, problems
