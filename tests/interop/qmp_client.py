"""Minimal QMP client over a unix socket (stdlib only).

Replies are decoded with a streaming JSON decoder: the server terminates
messages with \\r\\n, but nothing here relies on it.  Every asynchronous event
("event" key) is appended to ``self.events`` in arrival order.  For each
command, ``self.events_before_reply`` holds the events that arrived after the
command was sent and before its reply.
"""

import json
import socket
import time


class QMPError(Exception):
    pass


class QMPTimeout(QMPError):
    pass


class QMPClosed(QMPError):
    pass


_WS = " \t\r\n"
NO_ID = object()  # sentinel: send no "id" member (None sends "id": null)


class QMPClient:
    def __init__(self, path, timeout=10.0):
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = ""
        self._raw = b""
        self._decoder = json.JSONDecoder()
        self._pending = []          # decoded non-event messages not yet consumed
        self.events = []            # every event, arrival order
        self.events_before_reply = []
        self.transcript = []        # ("->", bytes) / ("<-", dict)
        self.closed = False
        self.greeting = self.recv_msg()

    # -- low level -------------------------------------------------------
    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QMPTimeout("timeout waiting for QMP data")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise QMPTimeout("timeout waiting for QMP data")
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            raise QMPClosed("QMP connection closed")
        self._raw += data
        try:
            text = self._raw.decode("utf-8")
            self._raw = b""
        except UnicodeDecodeError as e:
            # incomplete multi-byte sequence at the end
            text = self._raw[: e.start].decode("utf-8")
            self._raw = self._raw[e.start:]
        self._buf += text

    def _try_decode(self):
        buf = self._buf.lstrip(_WS)
        self._buf = buf
        if not buf:
            return None
        try:
            obj, end = self._decoder.raw_decode(buf)
        except json.JSONDecodeError:
            return None  # need more data
        self._buf = buf[end:]
        return obj

    def recv_msg(self, timeout=None):
        """Next message of any kind (events are also recorded in self.events)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            obj = self._try_decode()
            if obj is not None:
                self.transcript.append(("<-", obj))
                if isinstance(obj, dict) and "event" in obj:
                    self.events.append(obj)
                return obj
            self._fill(deadline)

    def recv_reply(self, timeout=None):
        """Next non-event message; events seen meanwhile go to events_before_reply."""
        if self._pending:
            return self._pending.pop(0)
        while True:
            msg = self.recv_msg(timeout)
            if isinstance(msg, dict) and "event" in msg:
                self.events_before_reply.append(msg)
                continue
            return msg

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(("->", data))
        self.sock.sendall(data)

    # -- high level ------------------------------------------------------
    def cmd_raw(self, data, timeout=None, expect_reply=True):
        """Send arbitrary bytes; return the next reply (or None)."""
        self.events_before_reply = []
        self.send_raw(data)
        if not expect_reply:
            return None
        return self.recv_reply(timeout)

    def cmd_obj(self, obj, timeout=None):
        return self.cmd_raw(json.dumps(obj), timeout)

    def cmd(self, name, _id=NO_ID, _timeout=None, **args):
        """Execute NAME with ARGS (underscores in keyword names become '-').

        Use ``cmd_args(name, dict)`` when an argument name would be ambiguous.
        """
        args = {k.replace("_", "-"): v for k, v in args.items()}
        return self.cmd_args(name, args, _id=_id, timeout=_timeout)

    def cmd_args(self, name, args=None, _id=NO_ID, timeout=None, oob=False):
        msg = {"exec-oob" if oob else "execute": name}
        if args is not None:
            msg["arguments"] = args
        if _id is not NO_ID:
            msg["id"] = _id
        return self.cmd_obj(msg, timeout)

    def ok(self, name, args=None, **kw):
        """Execute and assert success; return the 'return' value."""
        r = self.cmd_args(name, args, **kw)
        assert "return" in r, "%s %r failed: %r" % (name, args, r)
        return r["return"]

    def err(self, name, args=None, **kw):
        """Execute and assert failure; return the 'error' dict."""
        r = self.cmd_args(name, args, **kw)
        assert "error" in r, "%s %r unexpectedly succeeded: %r" % (name, args, r)
        return r["error"]

    def negotiate(self, enable=None):
        args = None if enable is None else {"enable": enable}
        r = self.cmd_args("qmp_capabilities", args)
        assert r == {"return": {}}, r
        return r

    def wait_event(self, name, timeout=5.0):
        """Return the first not-yet-consumed event NAME (including ones already received)."""
        for i, ev in enumerate(self.events):
            if ev.get("event") == name and not ev.get("_consumed"):
                ev["_consumed"] = True
                return ev
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout("event %s not received" % name)
            msg = self.recv_msg(remaining)
            if isinstance(msg, dict) and "event" in msg:
                if msg.get("event") == name:
                    msg["_consumed"] = True
                    return msg
            else:
                self._pending.append(msg)

    def expect_eof(self, timeout=5.0):
        """Read until the server closes the connection; return leftover messages."""
        msgs = []
        try:
            while True:
                msgs.append(self.recv_msg(timeout))
        except QMPClosed:
            return msgs
