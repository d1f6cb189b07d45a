"""QMP wire protocol (reference qmp-and-migration.md section 1), verified on QSD 10.0.2."""

import time

NEG_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"


def err(cls, desc, **extra):
    r = {"error": {"class": cls, "desc": desc}}
    r.update(extra)
    return r


def generic(desc, **extra):
    return err("GenericError", desc, **extra)


def assert_version_shape(v):
    assert set(v) == {"qemu", "package"}, v
    assert set(v["qemu"]) == {"major", "minor", "micro"}, v
    for k in ("major", "minor", "micro"):
        assert type(v["qemu"][k]) is int and v["qemu"][k] >= 0, v
    assert isinstance(v["package"], str), v


def test_greeting_shape(daemon):
    d = daemon(negotiate=False)
    g = d.qmp.greeting
    assert set(g) == {"QMP"}, g
    assert set(g["QMP"]) == {"version", "capabilities"}, g
    assert g["QMP"]["capabilities"] == ["oob"]
    assert_version_shape(g["QMP"]["version"])
    # the greeting's version equals query-version
    d.negotiate()
    assert d.qmp.cmd("query-version") == {"return": g["QMP"]["version"]}


def test_greeting_is_crlf_terminated_single_line(daemon):
    d = daemon(negotiate=False)
    r = d.qmp.cmd_raw(b'{"execute": "qmp_capabilities"}')
    assert r == {"return": {}}
    # raw framing check on a second connection-less path: the transcript of the
    # reply bytes is not kept, so check on a fresh command with a raw socket read
    d.qmp.send_raw(b'{"execute": "query-version", "id": "x"}')
    data = b""
    deadline = time.monotonic() + 5
    while not data.endswith(b"\r\n") and time.monotonic() < deadline:
        data += d.qmp.sock.recv(65536)
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1, data


def test_commands_before_negotiation(daemon):
    d = daemon(negotiate=False)
    q = d.qmp
    assert q.cmd("query-version") == err("CommandNotFound", NEG_DESC)
    assert q.cmd("query-version", _id=5) == err("CommandNotFound", NEG_DESC, id=5)
    assert q.cmd("blockdev-add", driver="null-co", node_name="n0") == \
        err("CommandNotFound", NEG_DESC)
    assert q.cmd("no-such-cmd") == err("CommandNotFound", NEG_DESC)
    # bad enable value: argument check first, still not negotiated afterwards
    assert q.cmd("qmp_capabilities", enable=["bogus"]) == \
        generic("Parameter 'null' does not accept value 'bogus'")
    assert q.cmd("query-version") == err("CommandNotFound", NEG_DESC)
    assert q.cmd("qmp_capabilities", _id="neg1") == {"return": {}, "id": "neg1"}
    # second negotiation
    assert q.cmd("qmp_capabilities") == err(
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    assert "return" in q.cmd("query-version")


def test_negotiate_with_oob(daemon):
    d = daemon(negotiate=False)
    assert d.qmp.cmd("qmp_capabilities", enable=["oob"]) == {"return": {}}
    d.negotiated = True
    # none of the commands supports OOB; id is echoed
    assert d.qmp.cmd_args("query-version", _id=3, oob=True) == \
        generic("The command query-version does not support OOB", id=3)
    assert d.qmp.cmd_args("quit", oob=True) == \
        generic("The command quit does not support OOB")
    assert "return" in d.qmp.cmd("query-version")


def test_exec_oob_without_oob_negotiated(daemon):
    d = daemon()
    assert d.qmp.cmd_args("query-version", _id=3, oob=True) == \
        generic("QMP input member 'exec-oob' is unexpected", id=3)


def test_id_echoed_verbatim(daemon):
    q = daemon().qmp
    for ident in ["neg1", 7, 0, -3, 1.5, None, True, [1, "a"], {"any": ["json", 1]},
                  {"nested": {"deep": [{"x": None}]}}, ""]:
        r = q.cmd("query-version", _id=ident)
        assert set(r) == {"return", "id"}, r
        assert r["id"] == ident and type(r["id"]) is type(ident), (ident, r)
    # also on errors
    assert q.cmd("no-such-cmd", _id={"a": [1]}) == err(
        "CommandNotFound", "The command no-such-cmd has not been found", id={"a": [1]})


def test_unknown_command(daemon):
    q = daemon().qmp
    assert q.cmd("no-such-cmd", _id=7) == err(
        "CommandNotFound", "The command no-such-cmd has not been found", id=7)
    assert q.cmd("no-such-cmd") == err(
        "CommandNotFound", "The command no-such-cmd has not been found")


def test_protocol_errors(daemon):
    q = daemon().qmp
    cases = [
        (b'{"foo":1}', "QMP input member 'foo' is unexpected"),
        (b'[1,2]', "QMP input must be a JSON object"),
        (b'"str"', "QMP input must be a JSON object"),
        (b'{"execute":"query-version","arguments":[]}',
         "QMP input member 'arguments' must be an object"),
        (b'{"execute":"query-version","arguments":null}',
         "QMP input member 'arguments' must be an object"),
        (b'{"execute":1}', "QMP input member 'execute' must be a string"),
        (b'garbage\n', "JSON parse error, invalid keyword 'garbage'"),
    ]
    for raw, desc in cases:
        assert q.cmd_raw(raw) == generic(desc), raw
    # an id that was read is echoed even on protocol errors
    assert q.cmd_raw(b'{"foo":1, "id": 4}') == generic("QMP input member 'foo' is unexpected", id=4)
    # the connection is still usable afterwards
    assert "return" in q.cmd("query-version", _id=1)


def test_two_commands_in_one_send(daemon):
    q = daemon().qmp
    first = q.cmd_raw(b'{"execute":"query-version","id":1}{"execute":"query-version","id":2}')
    second = q.recv_reply()
    assert first["id"] == 1 and "return" in first
    assert second["id"] == 2 and "return" in second
    # whitespace and newlines between objects are ignored
    first = q.cmd_raw(b'\n  {"execute":"query-version","id":3}\r\n\t {"execute":"no-such-cmd","id":4}\n')
    second = q.recv_reply()
    assert first["id"] == 3 and "return" in first
    assert second == err("CommandNotFound", "The command no-such-cmd has not been found", id=4)


def test_command_split_across_sends(daemon):
    q = daemon().qmp
    q.send_raw(b'{"execute":"query-ver')
    time.sleep(0.2)
    q.send_raw(b'sion", "id": ')
    time.sleep(0.2)
    r = q.cmd_raw(b'"split"}')
    assert r["id"] == "split" and "return" in r


def test_argument_validation_errors(daemon):
    q = daemon().qmp
    assert q.cmd("query-version", bogus=1) == generic("Parameter 'bogus' is unexpected")
    assert q.cmd("blockdev-add", node_name="x") == generic("Parameter 'driver' is missing")
    assert q.cmd("blockdev-add", driver="null-co", node_name="x", size="abc") == \
        generic("Invalid parameter type for 'size', expected: integer")
    assert q.cmd("blockdev-add", driver="null-co", node_name="x", read_only="yes") == \
        generic("Invalid parameter type for 'read-only', expected: boolean")
    assert q.cmd("blockdev-add", driver="nosuchdrv", node_name="x") == \
        generic("Parameter 'driver' does not accept value 'nosuchdrv'")
    assert q.cmd("blockdev-del") == generic("Parameter 'node-name' is missing")
    assert q.cmd("blockdev-reopen", options=[{"driver": "raw", "node-name": "r"}]) == \
        generic("Parameter 'options[0].file' is missing")
    assert q.cmd("blockdev-set-active", node_name="r") == \
        generic("Parameter 'active' is missing")
    # the child reference is resolved before raw's own options are range-checked
    assert q.cmd("blockdev-add", driver="raw", node_name="r", file="f", offset=-1) == \
        generic("Cannot find device='f' nor node-name='f'")
    # nothing was created by any of the failed calls
    assert q.cmd("query-named-block-nodes") == {"return": []}


def test_quit_closes_connection(daemon):
    d = daemon()
    assert d.qmp.cmd("quit", _id="bye") == {"return": {}, "id": "bye"}
    assert d.qmp.expect_eof() == []
    assert d.wait_exit() == 0
