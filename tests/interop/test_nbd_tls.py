"""NBD over TLS (x509 and PSK) on strata and qemu-storage-daemon: tls-creds-x509/-psk and
authz-simple/-list objects, nbd-server-start tls-creds/tls-authz, forced TLS before STARTTLS
and the refusal cases of reliability.md T4.1-T4.2. Certificates are made by certtool here.

Every scenario runs on both implementations with the same expectations (observed on QSD 10.0.2).
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

import nbd_raw
from conftest import need_tool
from nbd_raw import RawNBD

SIZE = 16 << 20
# gnutls_x509_crt_get_dn order, as QEMU matches it (the subject as stored: C first).
CLIENT_DN = "C=GB,O=Test,CN=client"
PSK_KEY = "9d3c8e4a6f2b1c7d0e5a9b8c7d6e5f40"

REP_ERR_TLS_REQD = nbd_raw.REP_ERR | 5


def certtool(*args):
    subprocess.run(["certtool"] + list(args), check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """dirs: server (CA + server cert for localhost/127.0.0.1), client (CA + client cert
    CN=client,O=Test,C=GB), rogue (client cert of another CA), psk (keys.psk of user alice)."""
    need_tool("certtool")
    root = tmp_path_factory.mktemp("pki")
    tmp = root / "tmp"
    for d in ("server", "client", "rogue", "psk", "tmp"):
        (root / d).mkdir()
    (tmp / "ca.info").write_text("cn = Test CA\nca\ncert_signing_key\nexpiration_days = 2\n")
    (tmp / "server.info").write_text(
        "organization = Test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
        "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n")
    (tmp / "client.info").write_text(
        "country = GB\norganization = Test\ncn = client\ntls_www_client\nencryption_key\n"
        "signing_key\nexpiration_days = 2\n")

    def key(path):
        certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", str(path))

    def ca(key_path, out):
        certtool("--generate-self-signed", "--load-privkey", str(key_path),
                 "--template", str(tmp / "ca.info"), "--outfile", str(out))

    def sign(ca_cert, ca_key, key_path, info, out):
        certtool("--generate-certificate", "--load-ca-certificate", str(ca_cert),
                 "--load-ca-privkey", str(ca_key), "--load-privkey", str(key_path),
                 "--template", str(tmp / info), "--outfile", str(out))

    key(tmp / "ca-key.pem")
    ca(tmp / "ca-key.pem", root / "server" / "ca-cert.pem")
    shutil.copy(root / "server" / "ca-cert.pem", root / "client" / "ca-cert.pem")
    key(root / "server" / "server-key.pem")
    sign(root / "server" / "ca-cert.pem", tmp / "ca-key.pem", root / "server" / "server-key.pem",
         "server.info", root / "server" / "server-cert.pem")
    key(root / "client" / "client-key.pem")
    sign(root / "client" / "ca-cert.pem", tmp / "ca-key.pem", root / "client" / "client-key.pem",
         "client.info", root / "client" / "client-cert.pem")
    key(tmp / "rogue-ca-key.pem")
    ca(tmp / "rogue-ca-key.pem", root / "rogue" / "ca-cert.pem")
    key(root / "rogue" / "client-key.pem")
    sign(root / "rogue" / "ca-cert.pem", tmp / "rogue-ca-key.pem",
         root / "rogue" / "client-key.pem", "client.info", root / "rogue" / "client-cert.pem")
    (root / "psk" / "keys.psk").write_text("alice:%s\n" % PSK_KEY)
    (root / "psk-wrong").mkdir()
    (root / "psk-wrong" / "keys.psk").write_text("alice:%s\n" % ("f" * 32))
    return {name: str(root / name) for name in ("server", "client", "rogue", "psk", "psk-wrong")}


def start(daemon, objects, server_args, writable=True):
    """A daemon created with `objects` (--object values), node 'disk' (raw, 16 MiB file), an
    NBD server on DIR/nbd.sock with `server_args` and export 'disk'; returns (daemon, socket)."""
    args = []
    for obj in objects:
        args += ["--object", obj]
    d = daemon(*args)
    img = os.path.join(d.dir, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d.qmp.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                              "file": {"driver": "file", "filename": img}})
    sock = os.path.join(d.dir, "nbd.sock")
    request = {"addr": {"type": "unix", "data": {"path": sock}}}
    request.update(server_args)
    d.qmp.ok("nbd-server-start", request)
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                  "writable": writable})
    return d, sock


def x509_server(daemon, pki, authz=None, extra_objects=()):
    objects = ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]]
    objects += list(extra_objects)
    server_args = {"tls-creds": "tls0"}
    if authz:
        server_args["tls-authz"] = authz
    return start(daemon, objects, server_args)


def tls_uri(sock, certs):
    return "nbds+unix:///disk?socket=%s&tls-certificates=%s" % (sock, certs)


def nbdinfo(*args):
    need_tool("nbdinfo")
    return subprocess.run(["nbdinfo"] + list(args), capture_output=True, text=True, timeout=60)


def qemu_io_tls(certs, sock, *commands, hostname="localhost"):
    need_tool("qemu-io")
    opts = ("driver=nbd,server.type=unix,server.path=%s,export=disk,tls-creds=tls0" % sock)
    if hostname:
        opts += ",tls-hostname=" + hostname
    argv = ["qemu-io", "--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % certs,
            "--image-opts", opts]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# ---- working TLS ---------------------------------------------------------------------------

def test_x509_nbdinfo_qemu_io_qemu_img_nbdcopy(daemon, pki, workdir):
    d, sock = x509_server(daemon, pki)
    r = nbdinfo("--json", tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr
    assert '"TLS": true' in r.stdout
    assert '"export-size": %d' % SIZE in r.stdout

    r = qemu_io_tls(pki["client"], sock, "write -P 0x5a 1M 256k", "read -P 0x5a 1M 256k")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout

    need_tool("qemu-img")
    r = subprocess.run(
        ["qemu-img", "info", "--output=json", "--object",
         "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % pki["client"], "--image-opts",
         "driver=nbd,server.type=unix,server.path=%s,export=disk,tls-creds=tls0,"
         "tls-hostname=localhost" % sock],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"virtual-size": %d' % SIZE in r.stdout

    need_tool("nbdcopy")
    src = os.path.join(workdir, "src.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.truncate(SIZE)
    r = subprocess.run(["nbdcopy", src, tls_uri(sock, pki["client"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = os.path.join(workdir, "out.raw")
    r = subprocess.run(["nbdcopy", tls_uri(sock, pki["client"]), out],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(src, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_psk_nbdinfo_and_qemu_io(daemon, pki):
    d, sock = start(daemon, ["tls-creds-psk,id=tls0,dir=%s,endpoint=server" % pki["psk"]],
                    {"tls-creds": "tls0"})
    psk_file = os.path.join(pki["psk"], "keys.psk")
    r = nbdinfo("--json", "nbds+unix://alice@/disk?socket=%s&tls-psk-file=%s" % (sock, psk_file))
    assert r.returncode == 0, r.stderr
    assert '"TLS": true' in r.stdout
    need_tool("qemu-io")
    r = subprocess.run(
        ["qemu-io", "--object",
         "tls-creds-psk,id=tls0,dir=%s,endpoint=client,username=alice" % pki["psk"],
         "--image-opts",
         "driver=nbd,server.type=unix,server.path=%s,export=disk,tls-creds=tls0" % sock,
         "-c", "write -P 0x33 0 64k", "-c", "read -P 0x33 0 64k"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout
    # A wrong key never gets through.
    wrong = os.path.join(pki["psk-wrong"], "keys.psk")
    r = nbdinfo("nbds+unix://alice@/disk?socket=%s&tls-psk-file=%s" % (sock, wrong))
    assert r.returncode != 0


def test_authz_allows_listed_client_and_denies_others(daemon, pki):
    allow = ('{"qom-type": "authz-list", "id": "auth0", "policy": "deny", "rules": '
             '[{"match": "*,CN=client", "policy": "allow", "format": "glob"}]}')
    d, sock = x509_server(daemon, pki, authz="auth0", extra_objects=[allow])
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr
    # Swap the rules: the same client is now denied (authz is resolved per connection).
    d.qmp.ok("object-del", {"id": "auth0"})
    d.qmp.ok("object-add", {"qom-type": "authz-simple", "id": "auth0",
                            "identity": "CN=someone-else"})
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode != 0
    d.qmp.ok("object-del", {"id": "auth0"})
    d.qmp.ok("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr


def test_missing_authz_object_denies(daemon, pki):
    d, sock = x509_server(daemon, pki, authz="nosuch")
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode != 0
    assert d.qmp.ok("query-block-exports") is not None


# ---- refusals (T4.1) -----------------------------------------------------------------------

def test_plain_client_to_tls_server(daemon, pki):
    d, sock = x509_server(daemon, pki)
    r = nbdinfo("nbd+unix:///disk?socket=%s" % sock)
    assert r.returncode != 0
    c = RawNBD(sock)
    try:
        c.greeting()
        for option in (nbd_raw.OPT_STRUCTURED_REPLY, nbd_raw.OPT_LIST, nbd_raw.OPT_GO):
            payload = RawNBD.info_payload("disk") if option == nbd_raw.OPT_GO else b""
            replies = c.option(option, payload)
            assert replies == [(REP_ERR_TLS_REQD,
                                b"Option 0x%x not permitted before TLS" % option)]
        replies = c.option(nbd_raw.OPT_ABORT)
        assert replies == [(REP_ERR_TLS_REQD, b"Option 0x2 not permitted before TLS")]
        assert c.is_closed()
    finally:
        c.close()
    # EXPORT_NAME cannot carry an error: the server hangs up.
    c = RawNBD(sock)
    try:
        c.greeting()
        c.send_option(nbd_raw.OPT_EXPORT_NAME, b"disk")
        assert c.is_closed()
    finally:
        c.close()
    # STARTTLS with a payload: NBD_REP_ERR_INVALID, then the server hangs up.
    c = RawNBD(sock)
    try:
        c.greeting()
        replies = c.option(nbd_raw.OPT_STARTTLS, b"x")
        assert replies == [(nbd_raw.REP_ERR_INVALID, b"option 'starttls' has unexpected length")]
        assert c.is_closed()
    finally:
        c.close()


def test_tls_client_to_plain_server(daemon, pki, workdir):
    d, sock = start(daemon, [], {})
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode != 0
    c = RawNBD(sock)
    try:
        c.greeting()
        assert c.option(nbd_raw.OPT_STARTTLS) == [(nbd_raw.REP_ERR_POLICY, b"TLS not configured")]
    finally:
        c.close()


def test_wrong_ca_refused(daemon, pki):
    d, sock = x509_server(daemon, pki)
    r = nbdinfo(tls_uri(sock, pki["rogue"]))
    assert r.returncode != 0
    # The server still serves good clients.
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr


def test_qemu_client_needs_hostname_match(daemon, pki):
    d, sock = x509_server(daemon, pki)
    r = qemu_io_tls(pki["client"], sock, "read 0 4k", hostname="example.org")
    assert r.returncode != 0
    assert "Certificate does not match the hostname example.org" in r.stderr


# ---- STARTTLS hygiene (T4.2) ---------------------------------------------------------------

def test_plaintext_after_starttls_is_not_parsed(daemon, pki):
    d, sock = x509_server(daemon, pki)
    c = RawNBD(sock)
    try:
        c.greeting()
        # STARTTLS and two options in one segment: the options must go to the TLS layer.
        c.send(struct.pack(">QII", nbd_raw.OPT_MAGIC, nbd_raw.OPT_STARTTLS, 0) +
               struct.pack(">QII", nbd_raw.OPT_MAGIC, nbd_raw.OPT_STRUCTURED_REPLY, 0) +
               struct.pack(">QII", nbd_raw.OPT_MAGIC, nbd_raw.OPT_LIST, 0))
        option, rtype, data = c.recv_reply()
        assert (option, rtype, data) == (nbd_raw.OPT_STARTTLS, nbd_raw.REP_ACK, b"")
        rest = b""
        c.sock.settimeout(10)
        try:
            while True:
                chunk = c.sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        # At most a TLS alert record, never an option reply.
        assert struct.pack(">Q", nbd_raw.REP_MAGIC) not in rest
        assert rest == b"" or rest[0] == 21, rest[:16]
    finally:
        c.close()
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr


# ---- objects and server options ------------------------------------------------------------

def test_object_and_server_errors(daemon, pki, workdir):
    d = daemon("--object", "iothread,id=io0")
    q = d.qmp
    missing = os.path.join(workdir, "none")
    assert q.err("object-add", {"qom-type": "tls-creds-x509", "id": "t0", "dir": missing,
                                "endpoint": "server"})["desc"] \
        == "Unable to access credentials %s/ca-cert.pem: No such file or directory" % missing
    assert q.err("object-add", {"qom-type": "tls-creds-x509", "id": "t0",
                                "dir": pki["client"], "endpoint": "server"})["desc"] \
        == "Unable to access credentials %s/server-cert.pem: No such file or directory" \
        % pki["client"]
    assert q.err("object-add", {"qom-type": "tls-creds-psk", "id": "t0", "dir": missing,
                                "endpoint": "server"})["desc"] \
        == "Unable to access credentials %s/keys.psk: No such file or directory" % missing
    assert q.err("object-add", {"qom-type": "tls-creds-x509", "id": "t0",
                                "endpoint": "server"})["desc"] == "Missing 'dir' property value"
    assert q.err("object-add", {"qom-type": "tls-creds-x509", "id": "t0", "dir": pki["server"],
                                "endpoint": "bogus"})["desc"] \
        == "Parameter 'endpoint' does not accept value 'bogus'"
    assert q.err("object-add", {"qom-type": "authz-list", "id": "a0", "rules": [
        {"match": "x", "policy": "allow", "format": "bad"}]})["desc"] \
        == "Parameter 'format' does not accept value 'bad'"
    q.ok("object-add", {"qom-type": "tls-creds-x509", "id": "cli", "dir": pki["client"],
                        "endpoint": "client"})
    assert q.err("object-add", {"qom-type": "authz-simple", "id": "cli",
                                "identity": "x"})["desc"] \
        == "attempt to add duplicate property 'cli' to object (type 'container')"
    q.ok("object-add", {"qom-type": "authz-simple", "id": "a1", "identity": "x"})
    sock = os.path.join(d.dir, "nbd.sock")
    addr = {"type": "unix", "data": {"path": sock}}
    assert q.err("nbd-server-start", {"addr": addr, "tls-creds": "cli"})["desc"] \
        == "Expected TLS credentials for a server endpoint"
    assert q.err("nbd-server-start", {"addr": addr, "tls-creds": "io0"})["desc"] \
        == "Object with id 'io0' is not TLS credentials"
    assert q.err("nbd-server-start", {"addr": addr, "tls-creds": "a1"})["desc"] \
        == "Object with id 'a1' is not TLS credentials"
    # qemu-storage-daemon accepts (and ignores) tls-authz without tls-creds.
    q.ok("nbd-server-start", {"addr": addr, "tls-authz": "a1"})
    q.ok("nbd-server-stop")
    assert q.err("object-del", {"id": "nosuch"})["desc"] == "object 'nosuch' not found"
    q.ok("object-del", {"id": "cli"})
    q.ok("object-del", {"id": "a1"})


def test_command_line_object_errors(daemon, pki, workdir):
    missing = os.path.join(workdir, "none")
    d = daemon("--object", "tls-creds-x509,id=t0,dir=%s,endpoint=server" % missing,
               connect=False)
    assert d.wait_exit() == 1
    assert ("--object tls-creds-x509,id=t0,dir=%s,endpoint=server: Unable to access "
            "credentials %s/ca-cert.pem: No such file or directory" % (missing, missing)) \
        in d.stderr()


def test_command_line_nbd_server_with_tls(daemon, pki, workdir):
    img = os.path.join(workdir, "cli.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    sock = os.path.join(workdir, "cli.sock")
    d = daemon("--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"],
               "--object", "authz-simple,id=auth0,identity=%s" % CLIENT_DN.replace(",", ",,"),
               "--blockdev", "driver=file,node-name=disk,filename=%s" % img,
               "--nbd-server", "addr.type=unix,addr.path=%s,tls-creds=tls0,tls-authz=auth0"
               % sock,
               "--export", "type=nbd,id=disk,node-name=disk,name=disk")
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr
    assert nbdinfo("nbd+unix:///disk?socket=%s" % sock).returncode != 0


def test_creds_deleted_while_server_runs(daemon, pki):
    # QEMU lets object-del remove credentials a running server uses; the server keeps its
    # reference and keeps serving TLS clients.
    d, sock = x509_server(daemon, pki)
    d.qmp.ok("object-del", {"id": "tls0"})
    r = nbdinfo(tls_uri(sock, pki["client"]))
    assert r.returncode == 0, r.stderr
    d.qmp.ok("nbd-server-stop")
    assert d.qmp.err("object-del", {"id": "tls0"})["desc"] == "object 'tls0' not found"


def test_stalled_tls_handshake_blocks_nobody_and_is_dropped(daemon, pki):
    objects = ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]]
    d, sock = start(daemon, objects, {"tls-creds": "tls0", "handshake-max-seconds": 2})
    stalled = RawNBD(sock, timeout=30)
    try:
        stalled.greeting()
        assert stalled.option(nbd_raw.OPT_STARTTLS) == [(nbd_raw.REP_ACK, b"")]
        # Half a TLS record header, then silence: the server waits inside the TLS handshake.
        stalled.send(b"\x16\x03")
        r = nbdinfo(tls_uri(sock, pki["client"]))
        assert r.returncode == 0, r.stderr
        assert d.qmp.ok("query-block-exports") is not None
        assert stalled.is_closed(timeout=30)
    finally:
        stalled.close()


def test_sanity_check_refuses_unfit_server_certificate(daemon, pki, workdir):
    # certtool gives ECDSA keys no key-encipherment usage; QEMU's sanity check refuses such a
    # server certificate unless sanity-check=off.
    bad = os.path.join(workdir, "ecdsa")
    os.makedirs(bad)
    shutil.copy(os.path.join(pki["server"], "ca-cert.pem"), bad)
    info = os.path.join(workdir, "ecdsa.info")
    with open(info, "w") as f:
        f.write("cn = localhost\ntls_www_server\nencryption_key\nsigning_key\n"
                "expiration_days = 2\n")
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile",
             os.path.join(bad, "server-key.pem"))
    ca_key = os.path.join(os.path.dirname(pki["server"]), "tmp", "ca-key.pem")
    certtool("--generate-certificate", "--load-ca-certificate",
             os.path.join(bad, "ca-cert.pem"), "--load-ca-privkey", ca_key,
             "--load-privkey", os.path.join(bad, "server-key.pem"), "--template", info,
             "--outfile", os.path.join(bad, "server-cert.pem"))
    d = daemon()
    cert = os.path.join(bad, "server-cert.pem")
    assert d.qmp.err("object-add", {"qom-type": "tls-creds-x509", "id": "t0", "dir": bad,
                                    "endpoint": "server"})["desc"] \
        == "Certificate %s usage does not permit key encipherment" % cert
    d.qmp.ok("object-add", {"qom-type": "tls-creds-x509", "id": "t0", "dir": bad,
                            "endpoint": "server", "sanity-check": False})


# ---- the daemon as a TLS client (driver nbd, tls-creds) ------------------------------------
# The client daemon opens the TLS export as node 'remote' and serves it again over plain NBD;
# qemu-io reads and writes through that, and the server's file shows what arrived.

def qemu_nbd_tls_server(workdir, objects, tls_args):
    """qemu-nbd serving a 16 MiB raw file as export 'disk' over TLS; returns (proc, sock, img)."""
    return serve_with_tls("qemu-nbd", workdir, objects, tls_args)


def remote_node(sock, **extra):
    args = {"driver": "raw", "node-name": "remote",
            "file": {"driver": "nbd", "server": {"type": "unix", "path": sock},
                     "export": "disk"}}
    args["file"].update(extra)
    return args


def reexport(d):
    """Serves node 'remote' of `d` as plain export 'remote'; returns its nbd+unix URI."""
    sock = os.path.join(d.dir, "plain.sock")
    d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "remote", "node-name": "remote",
                                  "writable": True})
    return "nbd+unix:///remote?socket=%s" % sock


def qemu_io_uri(uri, *commands):
    need_tool("qemu-io")
    argv = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout, r.stdout
    return r


def test_client_x509_against_qemu_nbd(daemon, pki, workdir):
    proc, sock, img = qemu_nbd_tls_server(
        workdir, ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]],
        ["--tls-creds", "tls0"])
    try:
        with open(img, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"\x5a" * (256 << 10))
        d = daemon("--object", "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"])
        d.qmp.ok("blockdev-add", remote_node(sock, **{"tls-creds": "cli",
                                                      "tls-hostname": "localhost"}))
        uri = reexport(d)
        qemu_io_uri(uri, "read -P 0x5a 1M 256k", "read -P 0 0 1M",
                    "write -P 0x6b 4M 1M", "read -P 0x6b 4M 1M")
        d.qmp.ok("block-export-del", {"id": "remote"})
        d.qmp.ok("blockdev-del", {"node-name": "remote"})
        with open(img, "rb") as f:
            f.seek(4 << 20)
            assert f.read(1 << 20) == b"\x6b" * (1 << 20)
    finally:
        proc.terminate()
        proc.wait(10)


def test_client_x509_against_same_daemon_kind(daemon, pki):
    server, sock = x509_server(daemon, pki)
    d = daemon("--object", "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"])
    d.qmp.ok("blockdev-add", remote_node(sock, **{"tls-creds": "cli",
                                                  "tls-hostname": "localhost"}))
    uri = reexport(d)
    qemu_io_uri(uri, "write -P 0x21 0 2M", "read -P 0x21 0 2M", "read -P 0 2M 1M")


def test_client_psk(daemon, pki, workdir):
    server, sock = start(daemon, ["tls-creds-psk,id=tls0,dir=%s,endpoint=server" % pki["psk"]],
                         {"tls-creds": "tls0"})
    d = daemon("--object",
               "tls-creds-psk,id=cli,dir=%s,endpoint=client,username=alice" % pki["psk"],
               "--object",
               "tls-creds-psk,id=bad,dir=%s,endpoint=client,username=alice" % pki["psk-wrong"])
    d.qmp.ok("blockdev-add", remote_node(sock, **{"tls-creds": "cli"}))
    uri = reexport(d)
    qemu_io_uri(uri, "write -P 0x44 64k 64k", "read -P 0x44 64k 64k")
    # A wrong key fails the handshake; the daemon stays up.
    args = remote_node(sock, **{"tls-creds": "bad"})
    args["node-name"] = "wrong"
    d.qmp.err("blockdev-add", args)
    assert d.qmp.ok("query-named-block-nodes") is not None


def test_client_tls_refusals(daemon, pki, workdir):
    server, sock = x509_server(daemon, pki)
    plain, plain_sock = start(daemon, [], {})
    d = daemon("--object", "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"],
               "--object", "tls-creds-x509,id=srv,dir=%s,endpoint=server" % pki["server"],
               "--object", "tls-creds-x509,id=rogue,dir=%s,endpoint=client" % pki["rogue"],
               "--object", "iothread,id=io0",
               "--object", "authz-simple,id=auth0,identity=x")

    def refused(sock, **extra):
        return d.qmp.err("blockdev-add", remote_node(sock, **extra))["desc"]

    assert refused(sock, **{"tls-creds": "nosuch"}) == "No TLS credentials with id 'nosuch'"
    assert refused(sock, **{"tls-creds": "srv"}) \
        == "Expected TLS credentials for a client endpoint"
    for other in ("io0", "auth0"):
        assert refused(sock, **{"tls-creds": other}) \
            == "Object with id '%s' is not TLS credentials" % other
    # x509 over a unix socket needs a name to check the certificate against.
    assert "No hostname for certificate validation" in refused(sock, **{"tls-creds": "cli"})
    assert "Certificate does not match the hostname example.org" in refused(
        sock, **{"tls-creds": "cli", "tls-hostname": "example.org"})
    # A server certificate from a CA the client does not trust.
    assert refused(sock, **{"tls-creds": "rogue", "tls-hostname": "localhost"})
    # A plain server answers STARTTLS with NBD_REP_ERR_POLICY.
    # (strata appends the server's message, which QEMU keeps as a hint outside the QMP error)
    assert refused(plain_sock, **{"tls-creds": "cli", "tls-hostname": "localhost"}) \
        .startswith("Denied by server for option 5 (starttls)")
    # A plain client of a TLS server is told TLS is required.
    assert "TLS negotiation required before option" in refused(sock)
    # tls-hostname alone is accepted and unused.
    d.qmp.ok("blockdev-add", remote_node(plain_sock, **{"tls-hostname": "example.org"}))


def test_client_x509_over_tcp_checks_the_inet_host(daemon, pki):
    # Without tls-hostname the certificate must carry the address the client connects to.
    objects = ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]]
    server = daemon(*sum([["--object", o] for o in objects], []))
    img = os.path.join(server.dir, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    server.qmp.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                                   "file": {"driver": "file", "filename": img}})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    server.qmp.ok("nbd-server-start", {"addr": {"type": "inet", "data": {
        "host": "127.0.0.1", "port": port}}, "tls-creds": "tls0"})
    server.qmp.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                       "writable": True})
    d = daemon("--object", "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"])
    node = {"driver": "raw", "node-name": "remote",
            "file": {"driver": "nbd", "export": "disk", "tls-creds": "cli",
                     "server": {"type": "inet", "host": "127.0.0.1", "port": port}}}
    d.qmp.ok("blockdev-add", node)
    qemu_io_uri(reexport(d), "write -P 0x77 0 64k", "read -P 0x77 0 64k")
    node["node-name"] = "other"
    node["file"]["tls-hostname"] = "example.org"
    assert "Certificate does not match the hostname example.org" in \
        d.qmp.err("blockdev-add", node)["desc"]


# ---- strata nbd / qemu-nbd: --tls-creds, --tls-authz and -L over TLS -----------------------

NBD_TOOLS = ("qemu-nbd", "strata")


def nbd_tool_argv(tool):
    if tool == "qemu-nbd":
        need_tool("qemu-nbd")
        return ["qemu-nbd"]
    from test_nbd_client import strata_bin
    return [strata_bin(), "nbd"]


def serve_with_tls(tool, workdir, objects, tls_args):
    """`tool` serving a 16 MiB raw file as export 'disk' with `objects` (--object values) and
    `tls_args` on a unix socket; returns (proc, sock, img)."""
    img = os.path.join(workdir, "%s.raw" % tool)
    with open(img, "wb") as f:
        f.truncate(SIZE)
    sock = os.path.join(workdir, "%s.sock" % tool)
    argv = nbd_tool_argv(tool) + ["-t", "-f", "raw", "-x", "disk", "-k", sock]
    for obj in objects:
        argv += ["--object", obj]
    proc = subprocess.Popen(argv + list(tls_args) + [img], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "%s did not start" % tool
        time.sleep(0.02)
    return proc, sock, img


@pytest.mark.parametrize("tool", NBD_TOOLS)
def test_nbd_tool_serves_tls_and_lists_over_tls(tool, pki, workdir):
    authz = "authz-simple,id=auth0,identity=%s" % CLIENT_DN.replace(",", ",,")
    proc, sock, _ = serve_with_tls(
        tool, workdir,
        ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"], authz],
        ["--tls-creds", "tls0", "--tls-authz", "auth0"])
    try:
        r = nbdinfo("--json", tls_uri(sock, pki["client"]))
        assert r.returncode == 0, r.stderr
        assert '"TLS": true' in r.stdout
        assert nbdinfo("nbd+unix:///disk?socket=%s" % sock).returncode != 0
        r = qemu_io_tls(pki["client"], sock, "write -P 0x3c 0 1M", "read -P 0x3c 0 1M")
        assert r.returncode == 0, r.stdout + r.stderr
        # Both listers, over TLS, print the same.
        listings = {}
        for lister in NBD_TOOLS:
            r = subprocess.run(
                nbd_tool_argv(lister) + [
                    "--object", "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"],
                    "-L", "-k", sock, "--tls-creds", "cli", "--tls-hostname", "localhost"],
                capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            listings[lister] = r.stdout
        assert listings["strata"] == listings["qemu-nbd"]
        assert " export: 'disk'\n" in listings["strata"]
        # Without TLS the listing is refused; with the wrong hostname too.
        refusals = {}
        for lister in NBD_TOOLS:
            r = subprocess.run(nbd_tool_argv(lister) + ["-L", "-k", sock], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 1
            refusals[lister] = r.stderr.split(": ", 1)[1].splitlines()[0]
        assert refusals["strata"] == refusals["qemu-nbd"]
        from test_nbd_client import strata_bin
        r = subprocess.run(
            [strata_bin(), "nbd", "--object",
             "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"], "-L", "-k", sock,
             "--tls-creds", "cli", "--tls-hostname", "example.org"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert "Certificate does not match the hostname example.org" in r.stderr
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("tool", NBD_TOOLS)
def test_nbd_tool_refuses_client_creds_for_serving(tool, pki, workdir):
    img = os.path.join(workdir, "img.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    r = subprocess.run(
        nbd_tool_argv(tool) + [
            "--object", "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"],
            "-k", os.path.join(workdir, "x.sock"), "--tls-creds", "cli", "-f", "raw", img],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.endswith(
        ": Failed to get TLS creds: Expected TLS credentials for a server endpoint\n"), r.stderr


# ---- nbds:// URIs in strata img and strata io ----------------------------------------------

def strata_tool(*args):
    from test_nbd_client import strata
    return strata(*args)


def test_nbds_uris_in_img_and_io(pki, workdir):
    proc, sock, img = serve_with_tls(
        "qemu-nbd", workdir, ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]],
        ["--tls-creds", "tls0"])
    uri = tls_uri(sock, pki["client"])
    try:
        r = strata_tool("img", "info", "--output=json", uri)
        assert r.returncode == 0, r.stderr
        assert '"virtual-size": %d' % SIZE in r.stdout
        r = strata_tool("io", "-f", "raw", "-c", "write -P 0x12 1M 64k", "-c",
                        "read -P 0x12 1M 64k", uri)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Pattern verification failed" not in r.stdout
        out = os.path.join(workdir, "copy.raw")
        r = strata_tool("img", "convert", "-f", "raw", "-O", "raw", uri, out)
        assert r.returncode == 0, r.stderr
        with open(img, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read()
        r = strata_tool("img", "compare", "-f", "raw", "-F", "raw", uri, out)
        assert r.returncode == 0, r.stdout + r.stderr
        # Refusals: another CA, a wrong name, no credentials, no TLS at all.
        r = strata_tool("img", "info", tls_uri(sock, pki["rogue"]))
        assert r.returncode == 1 and "Could not open" in r.stderr, r.stderr
        r = strata_tool("img", "info", uri + "&tls-hostname=example.org")
        assert r.returncode == 1
        assert "Certificate does not match the hostname example.org" in r.stderr
        r = strata_tool("img", "info", "nbds+unix:///disk?socket=%s" % sock)
        assert r.returncode == 1
        assert "needs tls-certificates=DIR (x509) or tls-psk-file=FILE (PSK)" in r.stderr
        r = strata_tool("img", "info", "nbd+unix:///disk?socket=%s" % sock)
        assert r.returncode == 1
        assert "TLS negotiation required before option 7 (go)" in r.stderr
        r = strata_tool("img", "info", "nbd+unix:///disk?socket=%s&tls-certificates=%s"
                        % (sock, pki["client"]))
        assert r.returncode == 1 and "No valid URL specified" in r.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_nbds_psk_and_tcp_uris(pki, workdir):
    proc, sock, img = serve_with_tls(
        "qemu-nbd", workdir, ["tls-creds-psk,id=tls0,dir=%s,endpoint=server" % pki["psk"]],
        ["--tls-creds", "tls0"])
    keys = os.path.join(pki["psk"], "keys.psk")
    try:
        r = strata_tool("io", "-f", "raw", "-c", "write -P 0x5e 0 4k", "-c", "read -P 0x5e 0 4k",
                        "nbds+unix://alice@/disk?socket=%s&tls-psk-file=%s" % (sock, keys))
        assert r.returncode == 0, r.stdout + r.stderr
        r = strata_tool("img", "info", "nbds+unix:///disk?socket=%s&tls-psk-file=%s"
                        "&tls-username=alice" % (sock, keys))
        assert r.returncode == 0, r.stderr
        r = strata_tool("img", "info", "nbds+unix://bob@/disk?socket=%s&tls-psk-file=%s"
                        % (sock, keys))
        assert r.returncode == 1 and "Username bob not found in PSK file" in r.stderr, r.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    # Over TCP the certificate is checked against the URI's host (the certificate has
    # 127.0.0.1 among its names).
    need_tool("qemu-nbd")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        ["qemu-nbd", "-t", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
         "--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"],
         "--tls-creds", "tls0", img], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        r = strata_tool("io", "-f", "raw", "-c", "read -P 0x5e 0 4k",
                        "nbds://127.0.0.1:%d/disk?tls-certificates=%s" % (port, pki["client"]))
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_object_option_in_img_and_io_matches_qemu(pki, workdir):
    """--object tls-creds-x509 and --image-opts driver=nbd,...,tls-creds=: strata img/io
    against qemu-img/qemu-io on the same TLS server."""
    proc, sock, img = serve_with_tls(
        "qemu-nbd", workdir, ["tls-creds-x509,id=tls0,dir=%s,endpoint=server" % pki["server"]],
        ["--tls-creds", "tls0"])
    obj = "tls-creds-x509,id=cli,dir=%s,endpoint=client" % pki["client"]
    opts = ("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=%s,"
            "file.export=disk,file.tls-creds=cli,file.tls-hostname=localhost" % sock)
    try:
        need_tool("qemu-img")
        need_tool("qemu-io")
        sizes = {}
        for tool in ("qemu", "strata"):
            argv = ["qemu-img"] if tool == "qemu" else None
            args = ["info", "--output=json", "--object", obj, "--image-opts", opts]
            if argv:
                r = subprocess.run(argv + args, capture_output=True, text=True, timeout=60)
            else:
                r = strata_tool("img", *args)
            assert r.returncode == 0, r.stderr
            sizes[tool] = json.loads(r.stdout)["virtual-size"]
        assert sizes["strata"] == sizes["qemu"] == SIZE
        r = strata_tool("io", "--object", obj, "--image-opts", "-c", "write -P 0x2f 0 64k", opts)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(["qemu-io", "--object", obj, "--image-opts", "-c",
                            "read -P 0x2f 0 64k", opts], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
        # Naming an object that was not created, or server credentials, fails as in qemu-img.
        errors = {}
        for tool in ("qemu", "strata"):
            for bad in ("nosuch", "srv"):
                args = ["info", "--object",
                        "tls-creds-x509,id=srv,dir=%s,endpoint=server" % pki["server"],
                        "--image-opts", opts.replace("tls-creds=cli", "tls-creds=" + bad)]
                if tool == "qemu":
                    r = subprocess.run(["qemu-img"] + args, capture_output=True, text=True,
                                       timeout=60)
                else:
                    r = strata_tool("img", *args)
                assert r.returncode == 1
                errors[(tool, bad)] = r.stderr.split(": ", 1)[1]
        for bad in ("nosuch", "srv"):
            assert errors[("strata", bad)] == errors[("qemu", bad)]
    finally:
        proc.terminate()
        proc.wait(10)
