"""Remote origins on strata and qemu-storage-daemon: the http driver against a real web server
(lighttpd on 127.0.0.1, which honours Range requests), and block-stream from an http origin and
from a slow NBD origin (nbdkit's file plugin behind its delay filter) into a local qcow2 overlay.

Each scenario runs on both daemons: blockdev-add errors compared by text, reads compared byte
for byte with qemu-img compare over an NBD export, streams checked with qemu-img check and
qemu-img compare against what the chain read plus the guest's writes. An origin stopped
mid-stream must end the job with an error, leave a consistent overlay, and a second stream after
the origin is back must complete with the right content.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import need_tool
from test_backup_jobs import collect_until, compare, img, qio, run_cmd, start_nbd
from test_stream import assert_chain_content, check_clean, info

MiB = 1 << 20
START_TIMEOUT = 10.0


def lighttpd_binary():
    for candidate in (shutil.which("lighttpd"), "/usr/sbin/lighttpd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("lighttpd is not installed (Debian package lighttpd; scripts/install-deps --peers)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, what, proc):
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise AssertionError("%s exited with %s" % (what, proc.returncode))
        assert time.monotonic() < deadline, "%s did not come up" % what
        time.sleep(0.02)


class HttpOrigin:
    """lighttpd serving `root` on a fixed local port; stop() kills it, start() brings it back."""

    def __init__(self, root, workdir, tls=False):
        self.binary = lighttpd_binary()
        self.root = root
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.conf = os.path.join(workdir, "lighttpd.conf")
        with open(self.conf, "w") as f:
            f.write('server.document-root = "%s"\n' % root)
            f.write('server.bind = "127.0.0.1"\n')
            f.write("server.port = %d\n" % self.port)
            f.write('server.errorlog = "%s"\n' % os.path.join(workdir, "lighttpd.log"))
            f.write('mimetype.assign = ( "" => "application/octet-stream" )\n')
            if tls:
                f.write(self_signed_tls_config(workdir))
        self.proc = None

    def url(self, name):
        return "%s://127.0.0.1:%d/%s" % (self.scheme, self.port, name)

    def node_filename(self, name):
        return self.url(name)

    def _accepts(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-D", "-f", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._accepts, "lighttpd", self.proc)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def self_signed_tls_config(workdir):
    """lighttpd's mod_openssl settings with a fresh self-signed certificate for 127.0.0.1."""
    if not os.path.exists("/usr/lib/lighttpd/mod_openssl.so"):
        pytest.skip("lighttpd's TLS module is not installed (Debian package lighttpd-mod-openssl)")
    need_tool("openssl")
    cert, key = (os.path.join(workdir, n) for n in ("cert.pem", "key.pem"))
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return ('server.modules += ( "mod_openssl" )\nssl.engine = "enable"\n'
            'ssl.pemfile = "%s"\nssl.privkey = "%s"\n' % (cert, key))


class NbdkitOrigin:
    """nbdkit serving a file read-only over a unix socket, each read delayed (a slow origin)."""

    def __init__(self, path, workdir, rdelay="5ms"):
        need_tool("nbdkit")
        self.sock = os.path.join(workdir, "origin.sock")
        self.argv = ["nbdkit", "-f", "-r", "-U", self.sock, "--filter=delay", "file",
                     "file=" + path, "rdelay=" + rdelay]
        self.proc = None

    def url(self, _name=None):
        return "nbd+unix:///?socket=" + self.sock

    def node_filename(self, _name=None):
        """The filename both daemons give the nbd node (QEMU's nbd_refresh_filename form)."""
        return "nbd+unix://?socket=" + self.sock

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.exists(self.sock), "nbdkit", self.proc)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def origins():
    """Factory: origins(kind, root_dir, file_path) -> a started HttpOrigin or NbdkitOrigin."""
    started = []

    def make(kind, root, path):
        if kind == "http":
            origin = HttpOrigin(root, os.path.dirname(root))
        else:
            origin = NbdkitOrigin(path, os.path.dirname(root))
        origin.start()
        started.append(origin)
        return origin

    yield make
    for origin in started:
        origin.stop()


def make_origin_file(d, size):
    """DIR/www/disk.raw with data that differs in every 4 KiB block."""
    root = os.path.join(d.dir, "www")
    os.makedirs(root)
    path = os.path.join(root, "disk.raw")
    with open(path, "wb") as f:
        block = os.urandom(4096)
        for i in range(size // 4096):
            f.write(i.to_bytes(8, "little") + block[8:])
    return root, path


def add_http(q, url, **extra):
    return q.cmd_args("blockdev-add", dict({"driver": "http", "node-name": "h0", "url": url,
                                            "read-only": True}, **extra))


# -- the http driver on its own ------------------------------------------------------------

def test_http_node_reads_the_origin(daemon, origins):
    d = daemon()
    root, path = make_origin_file(d, 4 * MiB + 4096)
    origin = origins("http", root, path)
    url = origin.url("disk.raw")
    assert add_http(d.qmp, url, readahead=64 * 1024) == {"return": {}}
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    node = nodes["h0"]
    assert node["drv"] == "http" and node["file"] == url and node["ro"] is True
    assert node["image"] == {"virtual-size": 4 * MiB + 4096, "filename": url, "format": "http"}
    uri = start_nbd_read_only(d, "h0")
    r = compare(uri, path, fmt_a="raw")
    assert r.returncode == 0, r.stdout + r.stderr
    # Small reads scattered over the file, each checked against the origin's bytes.
    with open(path, "rb") as f:
        for offset in (0, 512, 4096 * 7 + 100, 3 * MiB + 12345, 4 * MiB + 4000):
            f.seek(offset)
            expected = f.read(96)
            r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -v %d 96" % offset,
                                uri], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert dump_bytes(r.stdout) == expected, offset


def start_nbd_read_only(d, node):
    sock = os.path.join(d.dir, "nbd.sock")
    d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "exp-" + node, "node-name": node})
    return "nbd+unix:///%s?socket=%s" % (node, sock)


def dump_bytes(text):
    """The bytes of qemu-io's `read -v` hex dump."""
    out = bytearray()
    for line in text.splitlines():
        if len(line) > 10 and line[8:10] == ": ":
            out += bytes.fromhex(line[10:10 + 48].replace(" ", ""))
    return bytes(out)


def test_auto_read_only_opens_read_only(daemon, origins):
    d = daemon()
    root, path = make_origin_file(d, MiB)
    origin = origins("http", root, path)
    r = d.qmp.cmd_args("blockdev-add", {"driver": "http", "node-name": "h0", "read-only": False,
                                        "auto-read-only": True, "url": origin.url("disk.raw")})
    assert r == {"return": {}}
    assert d.qmp.ok("query-named-block-nodes")[0]["ro"] is True


def test_filename_is_a_json_description_with_credentials(daemon, origins):
    d = daemon()
    root, path = make_origin_file(d, MiB)
    url = origins("http", root, path).url("disk.raw")
    assert add_http(d.qmp, url, cookie="a=b", timeout=9) == {"return": {}}
    node = d.qmp.ok("query-named-block-nodes")[0]
    assert node["file"].startswith("json:")
    assert (json.loads(node["file"][5:]) ==
            {"driver": "http", "url": url, "cookie": "a=b"})


@pytest.mark.parametrize("extra,error", [
    ({"read-only": False}, "curl driver does not support writes"),
    ({"readahead": 1000}, "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512"),
    ({"readahead": -512}, "Value '-512' is out of range for parameter 'readahead'"),
    ({"timeout": 10001}, "timeout parameter is too large or negative"),
    ({"timeout": -1}, "timeout parameter is too large or negative"),
    ({"cookie": "a=b", "cookie-secret": "s0"},
     "curl driver cannot handle both cookie and cookie secret"),
    ({"password-secret": "nosuch"}, "No secret with id 'nosuch'"),
    ({"sslverify": False}, "Parameter 'sslverify' is unexpected"),
    ({"url": "https://127.0.0.1:1/x"},
     "http curl driver cannot handle the URL 'https://127.0.0.1:1/x' (does not start with "
     "'http://')"),
    ({"url": "HTTP://127.0.0.1:1/x"},
     "http curl driver cannot handle the URL 'HTTP://127.0.0.1:1/x' (does not start with "
     "'http://')"),
    ({"url": None}, "Parameter 'url' is missing"),
])
def test_open_errors(daemon, origins, extra, error):
    d = daemon()
    root, path = make_origin_file(d, MiB)
    args = {"driver": "http", "node-name": "h0", "read-only": True,
            "url": origins("http", root, path).url("disk.raw")}
    args.update(extra)
    args = {k: v for k, v in args.items() if v is not None}
    r = d.qmp.cmd_args("blockdev-add", args)
    assert r == {"error": {"class": "GenericError", "desc": error}}
    assert d.qmp.ok("query-named-block-nodes") == []


def test_https_driver_checks_its_scheme(daemon):
    d = daemon()
    r = d.qmp.cmd_args("blockdev-add", {"driver": "https", "node-name": "h0", "read-only": True,
                                        "url": "http://127.0.0.1:1/x", "sslverify": False})
    assert r["error"]["desc"] == ("https curl driver cannot handle the URL "
                                  "'http://127.0.0.1:1/x' (does not start with 'https://')")


def test_https_with_and_without_certificate_checks(daemon):
    d = daemon()
    root, path = make_origin_file(d, MiB)
    origin = HttpOrigin(root, d.dir, tls=True)
    origin.start()
    try:
        url = origin.url("disk.raw")
        r = d.qmp.cmd_args("blockdev-add", {"driver": "https", "node-name": "h0",
                                            "read-only": True, "url": url})
        # The self-signed certificate fails verification (libcurl's text follows).
        assert r["error"]["desc"].startswith("CURL: Error opening file: "), r
        r = d.qmp.cmd_args("blockdev-add", {"driver": "https", "node-name": "h0",
                                            "read-only": True, "url": url, "sslverify": False})
        assert r == {"return": {}}
        node = d.qmp.ok("query-named-block-nodes")[0]
        assert node["drv"] == "https"
        assert json.loads(node["file"][5:]) == {"driver": "https", "url": url,
                                                "sslverify": False}
        uri = start_nbd_read_only(d, "h0")
        r = compare(uri, path, fmt_a="raw")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        origin.stop()


def test_origin_errors_at_open(daemon, origins):
    d = daemon()
    root, path = make_origin_file(d, MiB)
    origin = origins("http", root, path)
    r = add_http(d.qmp, origin.url("missing.raw"))
    assert r["error"]["desc"] == ("CURL: Error opening file: The requested URL returned "
                                  "error: 404")
    origin.stop()
    r = add_http(d.qmp, origin.url("disk.raw"))
    # libcurl's text names the time it took ("after 0 ms"); the rest is fixed.
    assert r["error"]["desc"].startswith("CURL: Error opening file: Failed to connect to "
                                         "127.0.0.1 port %d after " % origin.port)


def test_server_without_byte_ranges_is_refused(daemon):
    d = daemon()
    root, _ = make_origin_file(d, MiB)
    port = free_port()
    # Python's http.server answers HEAD with a length but no Accept-Ranges.
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               "--directory", root, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def accepts():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(accepts, "http.server", server)
        r = add_http(d.qmp, "http://127.0.0.1:%d/disk.raw" % port)
        assert r["error"]["desc"] == ("CURL: Error opening file: Server does not support "
                                      "'range' (byte ranges).")
    finally:
        server.kill()
        server.wait()


# -- streaming from a remote origin ----------------------------------------------------------

def make_overlay(d, origin, path):
    """A local qcow2 overlay whose stored backing file name is the origin's URL; returns the
    overlay's path and a raw copy of what it reads."""
    top = os.path.join(d.dir, "top.qcow2")
    img("create", "-q", "-f", "qcow2", "-b", origin.url("disk.raw"), "-F", "raw", top)
    expected = os.path.join(d.dir, "expected.raw")
    shutil.copyfile(path, expected)
    return top, expected


def add_top(q, top):
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}})


def completed_event(events):
    done = [e[1] for e in events if isinstance(e, tuple) and e[0] == "BLOCK_JOB_COMPLETED"]
    assert done, events
    return done[0]


def wait_for_progress(q, at_least):
    deadline = time.monotonic() + 60
    while True:
        jobs = q.ok("query-block-jobs")
        if not jobs or jobs[0]["offset"] >= at_least:
            return
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["http", "nbdkit"])
def test_stream_from_origin_under_guest_writes(daemon, origins, kind):
    d = daemon()
    root, path = make_origin_file(d, 8 * MiB)
    origin = origins(kind, root, path)
    top, expected = make_overlay(d, origin, path)
    add_top(d.qmp, top)
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == origin.node_filename("disk.raw")
    assert nodes["top"]["image"]["backing-image"]["filename"] == origin.node_filename("disk.raw")
    uri = start_nbd(d, "top")
    r, _ = run_cmd(d.qmp, "block-stream", {"job-id": "s0", "device": "top", "speed": MiB})
    assert r == {"return": {}}, r
    writes = [(0x41, 6 * MiB + 4096, 8192), (0x42, 3 * MiB, MiB), (0x43, 0, 4096)]
    for pattern, offset, length in writes:
        qio("-f", "raw", "-c", "write -P 0x%x %d %d" % (pattern, offset, length), uri)
    d.qmp.ok("block-job-set-speed", {"device": "s0", "speed": 0})
    events = collect_until(d.qmp, "null", timeout=120)
    assert "error" not in completed_event(events), events
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert "backing_file" not in nodes["top"]["image"]
    d.qmp.ok("block-export-del", {"id": "exp-top"})
    d.qmp.ok("nbd-server-stop")
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    origin.stop()  # the overlay no longer needs its origin
    assert "backing-filename" not in info(top)
    check_clean(top)
    assert_chain_content(top, expected, writes)


@pytest.mark.parametrize("kind", ["http", "nbdkit"])
def test_origin_stopped_mid_stream_then_stream_again(daemon, origins, kind):
    d = daemon()
    size = 32 * MiB
    root, path = make_origin_file(d, size)
    origin = origins(kind, root, path)
    top, expected = make_overlay(d, origin, path)
    add_top(d.qmp, top)
    r, _ = run_cmd(d.qmp, "block-stream", {"job-id": "s0", "device": "top",
                                           "speed": 2 * MiB})
    assert r == {"return": {}}, r
    wait_for_progress(d.qmp, MiB)
    origin.stop()
    events = collect_until(d.qmp, "null", timeout=120)
    done = completed_event(events)
    assert done["error"] == "Input/output error", events
    assert done["offset"] < size
    # The overlay still names its origin and is consistent.
    nodes = {n["node-name"]: n for n in d.qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == origin.node_filename("disk.raw")
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    origin.start()
    check_clean(top)
    assert info(top)["backing-filename"] == origin.url("disk.raw")
    # With the origin back, a second stream completes and the content is the origin's.
    add_top(d.qmp, top)
    r, _ = run_cmd(d.qmp, "block-stream", {"job-id": "s1", "device": "top"})
    assert r == {"return": {}}, r
    events = collect_until(d.qmp, "null", timeout=120)
    assert "error" not in completed_event(events), events
    d.qmp.ok("blockdev-del", {"node-name": "top"})
    origin.stop()
    check_clean(top)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr
