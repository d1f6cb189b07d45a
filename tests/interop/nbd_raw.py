"""A raw NBD client over a socket (stdlib only), for protocol and limit tests.

Speaks the fixed-newstyle handshake and transmission byte by byte so tests can send exactly
what a hostile or unusual client would. Values are from NetworkBlockDevice/nbd doc/proto.md.
"""

import socket
import struct

INIT_MAGIC = 0x4E42444D41474943
OPT_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 4, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = REP_ERR | 1, REP_ERR | 2, REP_ERR | 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = REP_ERR | 6, REP_ERR | 9
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR = (1 << 15) | 1

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 22, 28, 75, 95


class Closed(Exception):
    pass


class RawNBD:
    def __init__(self, path=None, address=None, timeout=10.0):
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
        self.structured = False
        self.extended = False
        self.cookie = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- bytes -------------------------------------------------------------
    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed("connection closed after %d of %d bytes" % (len(out), n))
            out += chunk
        return out

    def is_closed(self, timeout=5.0):
        """True when the server closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
            return data == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # -- handshake ---------------------------------------------------------
    def greeting(self, client_flags=3):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == INIT_MAGIC and opt_magic == OPT_MAGIC, (hex(magic), hex(opt_magic))
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option, data=b"", length=None):
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", OPT_MAGIC, option, length) + data)

    def recv_reply(self):
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REP_MAGIC, hex(magic)
        return option, rtype, self.recv_exact(length)

    def option(self, option, data=b""):
        """Sends one option and returns every reply up to the final one (ACK or error)."""
        self.send_option(option, data)
        replies = []
        while True:
            opt, rtype, payload = self.recv_reply()
            assert opt == option, (opt, option)
            replies.append((rtype, payload))
            if rtype == REP_ACK or rtype & REP_ERR:
                return replies

    def structured_reply(self):
        r = self.option(OPT_STRUCTURED_REPLY)
        assert r[-1][0] == REP_ACK, r
        self.structured = True

    def extended_headers(self):
        r = self.option(OPT_EXTENDED_HEADERS)
        if r[-1][0] == REP_ACK:
            self.extended = True
            self.structured = True
        return r

    @staticmethod
    def info_payload(name, requests=()):
        name = name.encode() if isinstance(name, str) else name
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests)) +
                b"".join(struct.pack(">H", r) for r in requests))

    @staticmethod
    def meta_payload(name, queries):
        name = name.encode() if isinstance(name, str) else name
        out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            q = q.encode() if isinstance(q, str) else q
            out += struct.pack(">I", len(q)) + q
        return out

    def go(self, name, requests=()):
        """NBD_OPT_GO; returns (size, flags, infos) or raises AssertionError with the error."""
        replies = self.option(OPT_GO, self.info_payload(name, requests))
        assert replies[-1][0] == REP_ACK, replies
        infos = {}
        for rtype, payload in replies:
            if rtype == REP_INFO:
                infos[struct.unpack(">H", payload[:2])[0]] = payload[2:]
        size, flags = struct.unpack(">QH", infos[INFO_EXPORT])
        return size, flags, infos

    def set_meta(self, name, queries):
        replies = self.option(OPT_SET_META, self.meta_payload(name, queries))
        contexts = {}
        for rtype, payload in replies:
            if rtype == REP_META_CONTEXT:
                contexts[payload[4:].decode()] = struct.unpack(">I", payload[:4])[0]
        return contexts, replies

    def connect(self, name, structured=True, meta=()):
        self.greeting()
        if structured:
            self.structured_reply()
        contexts = {}
        if meta:
            contexts, _ = self.set_meta(name, meta)
        size, flags, _ = self.go(name)
        return size, flags, contexts

    # -- transmission ------------------------------------------------------
    def send_request(self, cmd, offset=0, length=0, flags=0, data=b""):
        self.cookie += 1
        if self.extended:
            header = struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, cmd, self.cookie, offset,
                                 length)
        else:
            header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.cookie, offset,
                                 length)
        self.send(header + data)
        return self.cookie

    def recv_simple_or_chunks(self, read_length=None):
        """Reads one complete reply. Returns (error, data_or_chunks)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = b""
            if error == 0 and read_length:
                data = self.recv_exact(read_length)
            return error, data
        chunks = []
        while True:
            if magic == STRUCTURED_REPLY_MAGIC:
                flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            elif magic == EXT_REPLY_MAGIC:
                flags, ctype, cookie, _off, length = struct.unpack(">HHQQQ", self.recv_exact(28))
            else:
                raise AssertionError("bad reply magic 0x%x" % magic)
            payload = self.recv_exact(length)
            chunks.append((ctype, flags, payload))
            if flags & REPLY_FLAG_DONE:
                break
            magic = struct.unpack(">I", self.recv_exact(4))[0]
        error = 0
        for ctype, _flags, payload in chunks:
            if ctype & (1 << 15):
                error = struct.unpack(">I", payload[:4])[0]
        return error, chunks

    def read(self, offset, length, flags=0):
        """READ; returns (error, bytes) with structured chunks reassembled."""
        self.send_request(CMD_READ, offset, length, flags)
        error, result = self.recv_simple_or_chunks(length)
        if error or not self.structured:
            return error, result
        buf = bytearray(length)
        for ctype, _flags, payload in result:
            if ctype == CHUNK_DATA:
                off = struct.unpack(">Q", payload[:8])[0] - offset
                buf[off:off + len(payload) - 8] = payload[8:]
            elif ctype == CHUNK_HOLE:
                pass  # zeroes already
        return error, bytes(buf)

    def command(self, cmd, offset=0, length=0, flags=0, data=b""):
        self.send_request(cmd, offset, length, flags, data)
        error, _ = self.recv_simple_or_chunks()
        return error

    def write(self, offset, data, flags=0):
        return self.command(CMD_WRITE, offset, len(data), flags, data)

    def block_status(self, offset, length, flags=0):
        self.send_request(CMD_BLOCK_STATUS, offset, length, flags)
        error, chunks = self.recv_simple_or_chunks()
        result = {}
        if error:
            return error, result
        for ctype, _flags, payload in chunks:
            if ctype == CHUNK_BLOCK_STATUS:
                cid = struct.unpack(">I", payload[:4])[0]
                ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
                result[cid] = ext
        return error, result

    def disconnect(self):
        self.send_request(CMD_DISC)
