"""A local HTTP origin for the http driver's tests: lighttpd (from Debian's package, which honours
Range requests) serving one directory on 127.0.0.1 and a free port. Tests skip when lighttpd is
not installed (`make test` installs it)."""

import os
import shutil
import socket
import subprocess
import time

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpOrigin:
    def __init__(self, root, workdir):
        binary = shutil.which("lighttpd") or (
            "/usr/sbin/lighttpd" if os.path.exists("/usr/sbin/lighttpd") else None)
        if binary is None:
            pytest.skip("lighttpd is not installed (make test installs it)")
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.config = os.path.join(workdir, "lighttpd.conf")
        with open(self.config, "w") as f:
            f.write('server.document-root = "%s"\n' % root)
            f.write('server.bind = "127.0.0.1"\n')
            f.write("server.port = %d\n" % self.port)
            f.write('server.errorlog = "%s"\n' % os.path.join(workdir, "lighttpd.log"))
            f.write('mimetype.assign = ( "" => "application/octet-stream" )\n')
        self.proc = None
        self.start()

    def url(self, name):
        return "http://127.0.0.1:%d/%s" % (self.port, name)

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-D", "-f", self.config],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, \
                    "lighttpd did not start"
                time.sleep(0.02)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
