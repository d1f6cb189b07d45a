"""Running strata img and the QEMU tools for the CLI tests that compare the two."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def strata_bin():
    path = Path(os.environ.get("STRATA_BIN", "build/strata"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"strata binary not found at {path}; build it or set STRATA_BIN")
    return str(path)


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


def qemu_img(*args):
    return run("qemu-img", *args)


def strata_img(*args):
    return run(strata_bin(), "img", *args)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def qemu_io(fmt, path, *commands):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    ok(run(*args, path))
