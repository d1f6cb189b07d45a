"""strata img commit against qemu-img commit on twin chains.

base.qcow2 <- mid.qcow2 <- top.qcow2 with data, zero clusters and overlapping writes in every
layer. After committing one twin with strata and the other with qemu-img: same exit code and
messages, every image of the chain reads the same as its twin (qemu-img compare), the top image
still reads what it read before (when it stays valid), and qemu-img check is clean everywhere.
"""

import os
import shutil
import subprocess

import pytest

STRATA = os.environ.get("STRATA_BIN", "strata")
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)


def run(*args, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def qemu_io(path, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    return ok(run(*args, path))


def build_chain(directory):
    os.makedirs(directory)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"))
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
           path("mid.qcow2")))
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
           "mid.qcow2", "-F", "qcow2", path("top.qcow2")))
    qemu_io(path("base.qcow2"), "write -P 1 0 1M", "write -P 1 6M 1M")
    qemu_io(path("mid.qcow2"), "write -P 2 512k 1M", "write -z 6M 128k")
    qemu_io(path("top.qcow2"), "write -P 3 4M 64k", "write -z 0 64k", "write -P 4 700k 5k",
            "write -P 5 7M 4k")
    return directory


SCENARIOS = {
    "default": [],
    "keep": ["-d"],
    "quiet": ["-q"],
    "base-by-name": ["-b", "base.qcow2"],
    "base-is-backing": ["-b", "mid.qcow2"],
    "missing-base": ["-b", "nope.qcow2"],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_commit_matches_qemu_img(tmp_path, name):
    ours = build_chain(str(tmp_path / "ours"))
    theirs = build_chain(str(tmp_path / "theirs"))
    before = str(tmp_path / "before.raw")
    ok(run("qemu-img", "convert", "-O", "raw", os.path.join(theirs, "top.qcow2"), before))
    mine = run(STRATA, "img", "commit", *SCENARIOS[name], "top.qcow2", cwd=ours)
    reference = run("qemu-img", "commit", *SCENARIOS[name], "top.qcow2", cwd=theirs)
    assert mine.returncode == reference.returncode
    assert mine.stdout == reference.stdout
    assert mine.stderr.replace("strata img", "qemu-img") == reference.stderr
    for image in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        ok(run("qemu-img", "check", os.path.join(ours, image)))
        ok(run("qemu-img", "compare", os.path.join(ours, image), os.path.join(theirs, image)))
    if name != "base-by-name":  # -b past an intermediate image leaves that one stale
        ok(run("qemu-img", "compare", "-F", "raw", os.path.join(ours, "top.qcow2"), before))


def test_commit_without_backing_file_fails_like_qemu_img(tmp_path):
    path = str(tmp_path / "alone.qcow2")
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M"))
    mine = run(STRATA, "img", "commit", path)
    reference = run("qemu-img", "commit", path)
    assert mine.returncode == reference.returncode == 1
    assert mine.stderr.replace("strata img", "qemu-img") == reference.stderr


def build_grown_chain(directory):
    """A 4M base under a 6M top with data past the base's end."""
    os.makedirs(directory)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "4M"))
    qemu_io(path("base.qcow2"), "write -P 1 0 4M")
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
           path("top.qcow2"), "6M"))
    qemu_io(path("top.qcow2"), "write -P 2 3M 2M")
    return directory


def test_commit_grows_a_smaller_base(tmp_path):
    ours = build_grown_chain(str(tmp_path / "ours"))
    theirs = build_grown_chain(str(tmp_path / "theirs"))
    mine = run(STRATA, "img", "commit", "top.qcow2", cwd=ours)
    reference = run("qemu-img", "commit", "top.qcow2", cwd=theirs)
    assert (mine.returncode, mine.stdout) == (reference.returncode, reference.stdout)
    for image in ("base.qcow2", "top.qcow2"):
        ok(run("qemu-img", "check", os.path.join(ours, image)))
        ok(run("qemu-img", "compare", os.path.join(ours, image), os.path.join(theirs, image)))
    info = ok(run("qemu-img", "info", "--output=json", os.path.join(ours, "base.qcow2"))).stdout
    assert '"virtual-size": 6291456' in info
