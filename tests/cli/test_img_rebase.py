"""strata img rebase against qemu-img rebase on twin images.

Each scenario builds the same chain twice, rebases one copy with strata and the other with
qemu-img, then checks: same exit code and stderr, same guest content (qemu-img compare against
the twin), `qemu-img check` clean, and the same backing file name and format in `qemu-img info`.
"""

import json
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


def qemu_io(path, *commands, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    return ok(run(*args, path))


def backing_of(path):
    info = json.loads(ok(run("qemu-img", "info", "--output=json", "-U", path)).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


def build_chain(directory, small_new_base=False):
    """old.qcow2 <- top.qcow2, plus new.qcow2 (different content) in `directory`."""
    os.makedirs(directory)
    old = os.path.join(directory, "old.qcow2")
    new = os.path.join(directory, "new.qcow2")
    top = os.path.join(directory, "top.qcow2")
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", old, "8M"))
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", new, "4M" if small_new_base else "8M"))
    qemu_io(old, "write -P 1 0 1M", "write -P 2 3M 128k", "write -P 3 6M 64k", "write -P 9 7M 4k")
    qemu_io(new, "write -P 1 0 512k", "write -P 5 3M 64k")
    ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", top),)
    qemu_io(top, "write -P 7 64k 64k", "write -P 8 6M 4k")
    return top


SCENARIOS = {
    "safe": ["-b", "new.qcow2", "-F", "qcow2"],
    "safe-progress": ["-p", "-b", "new.qcow2", "-F", "qcow2"],
    "safe-smaller-base": ["-b", "new.qcow2", "-F", "qcow2"],
    "remove-backing": ["-b", ""],
    "unsafe": ["-u", "-b", "new.qcow2", "-F", "qcow2"],
    "unsafe-missing-base": ["-u", "-b", "missing.qcow2", "-F", "qcow2"],
    "unsafe-remove": ["-u", "-b", ""],
    "no-format": ["-b", "new.qcow2"],
    "bad-format": ["-b", "new.qcow2", "-F", "nope"],
    "no-backing-option": [],
    "missing-new-base": ["-b", "missing.qcow2", "-F", "qcow2"],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rebase_matches_qemu_img(tmp_path, name):
    ours = build_chain(str(tmp_path / "ours"), small_new_base=name == "safe-smaller-base")
    theirs = build_chain(str(tmp_path / "theirs"), small_new_base=name == "safe-smaller-base")
    expected = None
    if name in ("safe", "safe-progress", "safe-smaller-base", "remove-backing"):
        # What the guest saw before: the rebased image must read the same afterwards.
        expected = str(tmp_path / "before.raw")
        ok(run("qemu-img", "convert", "-O", "raw", theirs, expected))
    mine = run(STRATA, "img", "rebase", *SCENARIOS[name], "top.qcow2", cwd=os.path.dirname(ours))
    reference = run("qemu-img", "rebase", *SCENARIOS[name], "top.qcow2",
                    cwd=os.path.dirname(theirs))
    assert mine.returncode == reference.returncode
    assert mine.stderr.replace("strata img", "qemu-img") == reference.stderr
    assert mine.stdout == reference.stdout
    assert backing_of(ours) == backing_of(theirs)
    if "missing" not in name:
        assert ok(run("qemu-img", "check", ours)).returncode == 0
    if expected is not None:
        ok(run("qemu-img", "compare", "-F", "raw", ours, expected))
    if "missing" not in name:
        ok(run("qemu-img", "compare", ours, theirs))
        # The same clusters were copied into the top image.
        assert _top_map(ours) == _top_map(theirs)


def _top_map(path):
    entries = json.loads(ok(run("qemu-img", "map", "--output=json", "-U", path)).stdout)
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in entries if e["depth"] == 0]
