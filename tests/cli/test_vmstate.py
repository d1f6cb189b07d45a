"""`strata vmstate info|verify` on files written by the hidden `strata vmstate save-test` mode
(RAM blocks of generated data in memfd memory), intact and damaged.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_vmstate.py
"""

import json
import os
import subprocess

import pytest

from img_tools import strata_bin
BLOCKS = "pc.ram:8M,/rom@etc/acpi/tables:128K,pc.bios:4K"
RAM_TOTAL = 8 * 1024 * 1024 + 128 * 1024 + 4096
SANITIZER_MARKERS = ("AddressSanitizer", "runtime error:", "LeakSanitizer")


def vmstate(*args):
    result = subprocess.run([strata_bin(), "vmstate", *map(str, args)], capture_output=True,
                            text=True, timeout=120)
    for marker in SANITIZER_MARKERS:
        assert marker not in result.stderr
    return result


def save(path, *extra):
    result = vmstate("save-test", f"--blocks={BLOCKS}", "--zero-every=4", "--seed=5", *extra,
                     path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.mark.parametrize("extra", [[], ["--channels=4"], ["--no-mapped-ram"]])
def test_info_human(workdir, extra):
    path = workdir / "vm.state"
    stats = save(path, *extra)
    result = vmstate("info", path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    mapped = "--no-mapped-ram" not in extra
    assert f"file: {path}\n" in out
    assert "format version: 1\n" in out
    assert ("capabilities: mapped-ram\n" if mapped else "capabilities: none (streaming)\n") in out
    assert (f"RAM: {RAM_TOTAL} bytes in 3 blocks, {stats['pages-present']} of "
            f"{RAM_TOTAL // 4096} pages present (the rest are zero)\n") in out
    assert "  pc.bios: length 4096," in out
    assert f"file size: {os.path.getsize(path)}\n" in out
    if "--channels=4" in extra:
        assert "written with: multifd (4 channels)\n" in out
    if mapped:
        assert "  pc.ram: length 8388608, " in out and ", pages at 0x100000\n" in out


def test_info_json(workdir):
    path = workdir / "vm.state"
    stats = save(path, "--channels=2")
    result = vmstate("info", "--output=json", path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["capabilities"] == ["mapped-ram"]
    assert info["ram-total"] == RAM_TOTAL
    assert info["multifd"] is True and info["multifd-channels"] == 2
    assert [b["name"] for b in info["blocks"]] == ["pc.ram", "/rom@etc/acpi/tables", "pc.bios"]
    assert sum(b["present-pages"] for b in info["blocks"]) == stats["pages-present"]
    for block in info["blocks"]:
        assert block["pages-offset"] % (1 << 20) == 0
    assert [s["type"] for s in info["sections"]] == ["ram-blocks", "end"]
    assert info["end-offset"] == info["file-size"] == os.path.getsize(path)


def test_verify_good_and_load_back(workdir):
    for extra in ([], ["--no-mapped-ram"], ["--channels=2", "--offset=8192"]):
        path = workdir / "vm.state"
        stats = save(path, *extra)
        offset = [a for a in extra if a.startswith("--offset")]
        result = vmstate("verify", *offset, path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"No errors were found in {path} (")
        assert vmstate("verify", "-q", *offset, path).stdout == ""
        channels = [a for a in extra if a.startswith("--channels")]
        loaded = vmstate("load-test", f"--blocks={BLOCKS}", "--zero-every=4", "--seed=5",
                         "--check", *offset, *channels, path)
        assert loaded.returncode == 0, loaded.stderr
        assert json.loads(loaded.stdout)["matches"] is True
        assert json.loads(loaded.stdout)["pages-present"] == stats["pages-present"]


def test_direct_io(workdir):
    path = workdir / "vm.state"
    result = vmstate("save-test", f"--blocks={BLOCKS}", "--channels=2", "--direct-io", path)
    if result.returncode != 0:
        assert "filesystem does not support O_DIRECT" in result.stderr
        pytest.skip("the file system refuses O_DIRECT: " + result.stderr.strip())
    info = vmstate("info", path)
    assert "written with: multifd (2 channels), direct-io\n" in info.stdout


def damage(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_verify_damaged(workdir):
    path = workdir / "vm.state"
    save(path, "--channels=2")
    size = os.path.getsize(path)
    good = path.read_bytes()

    cases = {
        "zeroed header": (lambda: damage(path, 0, bytes(80)), "the header is zeroed"),
        "bad magic": (lambda: damage(path, 0, b"QEVM\0\0\0\3"), "bad magic"),
        "flipped table": (lambda: damage(path, 100, b"\xff"), "checksum mismatch"),
        "truncated": (lambda: os.truncate(path, size - 100), "truncated"),
        "truncated header": (lambda: os.truncate(path, 40), "too short"),
    }
    for name, (make, message) in cases.items():
        path.write_bytes(good)
        make()
        for mode in ("verify", "info"):
            result = vmstate(mode, path)
            assert result.returncode == 2, (name, mode, result.stdout, result.stderr)
            assert result.stderr.startswith(f"strata vmstate: {path}: "), result.stderr
            assert message in result.stderr, (name, result.stderr)
            assert result.stdout == ""

    result = vmstate("verify", workdir / "missing.state")
    assert result.returncode == 1
    assert "Could not open" in result.stderr


def test_streaming_damage(workdir):
    path = workdir / "vm.stream"
    save(path, "--no-mapped-ram")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    result = vmstate("verify", path)
    assert result.returncode == 2
    assert "checksum mismatch in pages" in result.stderr


def test_usage_errors(workdir):
    assert vmstate().returncode == 1
    result = vmstate("info")
    assert result.returncode == 1 and "Expecting one file name" in result.stderr
    result = vmstate("info", "--output=xml", workdir / "x")
    assert result.returncode == 1 and "--output must be used with human or json" in result.stderr
    result = vmstate("frobnicate", workdir / "x")
    assert result.returncode == 1 and "unknown command 'frobnicate'" in result.stderr
    result = vmstate("--help")
    assert result.returncode == 0 and "strata vmstate info" in result.stdout
