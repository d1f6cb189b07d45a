"""strata img bench against qemu-img bench: the same flags give the same lines (up to the time in
"Run completed in X seconds."), the same errors and exit codes, and writes leave an image that
qemu-img check finds clean, holding the pattern where the requests went.
"""

import os
import re
import shutil
import subprocess

import pytest

STRATA = os.environ.get("STRATA_BIN", "strata")
pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed"
)

TIMING = re.compile(r"^Run completed in \d+\.\d{3} seconds\.$")


def run(*args, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def fresh_image(tmp_path, name):
    image = tmp_path / name
    created = run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    assert created.returncode == 0, created.stderr
    return image


def both(tmp_path, *args):
    """(strata result, qemu-img result, strata's image, qemu-img's image), each tool on its own
    fresh 64 MiB qcow2 image."""
    ours_image = fresh_image(tmp_path, "strata.qcow2")
    theirs_image = fresh_image(tmp_path, "qemu.qcow2")
    ours = run(STRATA, "img", "bench", *args, str(ours_image))
    theirs = run("qemu-img", "bench", *args, str(theirs_image))
    return ours, theirs, ours_image, theirs_image


def normalize(stdout):
    return [
        "Run completed in T seconds." if TIMING.match(line) else line
        for line in stdout.splitlines()
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "100"],
        ["-c", "300", "-d", "4", "-w"],
        ["-c", "200", "-d", "8", "-w", "-s", "64k", "-o", "1M", "-S", "128k", "--pattern", "0x5a"],
        ["-c", "256", "-d", "16", "-w", "--flush-interval", "32"],
        ["-c", "256", "-d", "16", "-w", "--flush-interval=32", "--no-drain"],
        ["-c", "50", "-t", "none", "-i", "threads", "-q"],
        ["--count=50", "--write", "--cache=writethrough", "--depth=2"],
        ["-c", "20", "-s", "1000", "-S", "0", "-o", "333"],
    ],
)
def test_output_lines_match_qemu_img(tmp_path, args):
    ours, theirs, ours_image, theirs_image = both(tmp_path, *args)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stderr == theirs.stderr == ""
    assert normalize(ours.stdout) == normalize(theirs.stdout)
    assert TIMING.match(ours.stdout.splitlines()[-1])
    if "-w" in args or "--write" in args:
        check = run("qemu-img", "check", str(ours_image))
        assert check.returncode == 0, check.stdout + check.stderr
        compare = run("qemu-img", "compare", "-q", str(ours_image), str(theirs_image))
        assert compare.returncode == 0, compare.stdout + compare.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "0"],
        ["-c", "x"],
        ["-c", "99999999999"],
        ["-d", "0"],
        ["-d", "x"],
        ["-o", "x"],
        ["-s", "0"],
        ["-s", "x"],
        ["-S", "x"],
        ["--pattern", "300"],
        ["--pattern", "x"],
        ["--flush-interval", "x"],
        ["-c", "10", "--flush-interval", "64"],
        ["-c", "10", "-w", "--flush-interval", "8"],
        ["-t", "bogus"],
        ["-i", "bogus"],
        ["-c", "10", "-o", "128M"],
        ["-c", "10", "-n"],
        ["-c", "10", "-w", "-U"],
    ],
)
def test_errors_match_qemu_img(tmp_path, args):
    ours, theirs, _, _ = both(tmp_path, *args)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("strata img", "qemu-img") == theirs.stderr.replace(
        str(tmp_path / "qemu.qcow2"), str(tmp_path / "strata.qcow2")
    )
    assert normalize(ours.stdout) == normalize(theirs.stdout)


def test_missing_file_name():
    ours = run(STRATA, "img", "bench")
    theirs = run("qemu-img", "bench")
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.splitlines()[0].replace("strata img", "qemu-img") == (
        theirs.stderr.splitlines()[0]
    )
