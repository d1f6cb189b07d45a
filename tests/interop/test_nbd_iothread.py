"""block-export-add `iothread`: an NBD export whose connections do their socket work on an
iothread. The same scenarios run against strata and qemu-storage-daemon.
"""

import os
import shutil
import subprocess

import pytest

SIZE = 64 << 20


def start(daemon):
    d = daemon()
    img = os.path.join(d.dir, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    d.qmp.ok("object-add", {"qom-type": "iothread", "id": "io0"})
    d.qmp.ok("blockdev-add", {"driver": "raw", "node-name": "disk",
                              "file": {"driver": "file", "filename": img}})
    sock = os.path.join(d.dir, "nbd.sock")
    d.qmp.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    d.qmp.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk",
                                  "writable": True, "iothread": "io0",
                                  "fixed-iothread": True})
    return d, sock, "nbd+unix:///disk?socket=" + sock


def test_fio_verify_with_four_clients(daemon):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    d, _sock, uri = start(daemon)
    # Four jobs (four connections) write disjoint 16 MiB regions and verify them.
    r = subprocess.run(["fio", "--name=v", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
                        "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=16M",
                        "--offset_increment=16M", "--verify=crc32c", "--verify_fatal=1",
                        "--output-format=json"], capture_output=True, text=True, timeout=300,
                       cwd=d.dir)  # fio leaves its verify state files in the working directory
    assert r.returncode == 0, r.stderr
    assert d.qmp.ok("query-block-exports")[0]["id"] == "e0"


def test_nbdcopy_round_trip(daemon, tmp_path):
    if shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy is not installed")
    d, _sock, uri = start(daemon)
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(1 << 20) * (SIZE >> 20))
    for connections in ("1", "4"):
        subprocess.run(["nbdcopy", "--connections=" + connections, str(source), uri],
                       check=True, timeout=300)
        copy = tmp_path / ("copy%s.raw" % connections)
        subprocess.run(["nbdcopy", "--connections=" + connections, uri, str(copy)], check=True,
                       timeout=300)
        assert copy.read_bytes() == source.read_bytes()


def test_iothread_deleted_while_in_use(daemon):
    # Both accept object-del of an iothread an export runs on. qemu-storage-daemon 10.0.2 then
    # stops answering once a client connects; strata keeps the thread until it exits and goes on
    # serving, and the id can be used again.
    d, sock, uri = start(daemon)
    d.qmp.ok("object-del", {"id": "io0"})
    if daemon.impl.name != "strata":
        return
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    assert r.stdout == "%d\n" % SIZE, r.stderr
    d.qmp.ok("object-add", {"qom-type": "iothread", "id": "io0"})
    d.qmp.ok("block-export-del", {"id": "e0"})
    d.qmp.wait_event("BLOCK_EXPORT_DELETED")


def thread_cpu_ticks(pid):
    """{thread id: user+sys clock ticks} of the threads named like the process (not io_uring
    workers)."""
    ticks = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
            text = f.read()
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if not name.startswith("iou-"):
            ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def test_socket_work_runs_on_the_iothread(daemon):
    if daemon.impl.name != "strata" or shutil.which("nbdcopy") is None:
        pytest.skip("strata's thread layout; needs nbdcopy")
    d, _sock, uri = start(daemon)
    source = os.path.join(d.dir, "source.raw")
    with open(source, "wb") as f:
        f.write(os.urandom(1 << 20) * (SIZE >> 20))
    before = thread_cpu_ticks(d.pid)
    for _ in range(4):
        subprocess.run(["nbdcopy", source, uri], check=True, timeout=300)
        subprocess.run(["nbdcopy", uri, "null:"], check=True, timeout=300)
    after = thread_cpu_ticks(d.pid)
    iothreads = [tid for tid in after if tid != d.pid]
    assert len(iothreads) == 1
    # 256 MiB came in through the iothread's receives and 256 MiB went out through its sends.
    assert after[iothreads[0]] - before.get(iothreads[0], 0) > 0
