"""`strata io` against qemu-io: the same commands on copies of the same image must print the same
text (the timing part of each report aside), exit with the same status and leave the same bytes.

Run: STRATA_BIN=build/strata /usr/bin/python3 -m pytest -q tests/cli/test_io.py
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")

pytestmark = pytest.mark.skipif(QEMU_IO is None or QEMU_IMG is None,
                                reason="qemu-io/qemu-img are not installed (Debian package qemu-utils)")

TIMING = re.compile(r"ops; [0-9:.]+( sec)? \([^)]*/sec and [0-9.inf]+ ops/sec\)")


def strata_bin():
    path = Path(os.environ.get("STRATA_BIN", "build/strata"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"strata binary not found at {path}; build it or set STRATA_BIN")
    return str(path)


def normalize(text):
    return TIMING.sub("ops; TIME", text).replace("qemu-io: ", "strata io: ")


def run_both(tmp_path, args, image_bytes=None, size=1 << 20, name="img.raw"):
    """Runs qemu-io and strata io with `args` (FILE replaced) on two identical images."""
    results = []
    for tool in ("qemu", "strata"):
        image = tmp_path / f"{tool}-{name}"
        if image_bytes is not None:
            image.write_bytes(image_bytes)
        else:
            subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", str(image), str(size)],
                           check=True)
        argv = [QEMU_IO] if tool == "qemu" else [strata_bin(), "io"]
        argv += [str(image) if a == "FILE" else a for a in args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        out = normalize(proc.stdout)
        err = normalize(proc.stderr).replace(str(image), "FILE")
        results.append((proc.returncode, out.replace(str(image), "FILE"), err, image))
    return results


def assert_same(results, compare_image=True):
    (qrc, qout, qerr, qimg), (src, sout, serr, simg) = results
    assert sout == qout
    assert serr == qerr
    assert src == qrc
    if compare_image:
        assert simg.read_bytes() == qimg.read_bytes()


def cmds(*commands):
    args = []
    for command in commands:
        args += ["-c", command]
    return args


def test_write_read_patterns(tmp_path):
    results = run_both(tmp_path, ["-f", "raw"] + cmds(
        "write -P 0xab 0 512", "read -P 0xab 0 512", "read -v 0 40", "write 4k 4k",
        "read -P 0xcd 4k 4k", "write -z 64k 64k", "read -P 0 64k 64k", "write -P 7 1M-512 512",
        "read -P 7 -s 256 -l 256 1048064 512", "writev -P 3 8k 512 1k", "readv -P 3 8k 1k 512",
        "length") + ["FILE"])
    assert_same(results)
    assert "wrote 512/512 bytes at offset 0" in results[1][1]


def test_size_suffixes_and_discard(tmp_path):
    results = run_both(tmp_path, ["-f", "raw"] + cmds(
        "write -P 1 0 1M", "discard 64k 64k", "read -P 0 64k 64k", "write -z -u 256k 128k",
        "read -P 0 256k 128k", "flush", "map") + ["FILE"], size=2 << 20)
    assert_same(results)
    assert "discard 65536/65536 bytes at offset 65536" in results[1][1]


def test_pattern_mismatch_fails_with_status_1(tmp_path):
    results = run_both(tmp_path, ["-f", "raw"] + cmds("read -P 0x11 0 4k", "read 0 512") + ["FILE"])
    assert_same(results)
    assert "Pattern verification failed at offset 0, 4096 bytes" in results[1][1]
    assert results[1][0] == 1


def test_command_errors(tmp_path):
    results = run_both(tmp_path, ["-f", "raw"] + cmds(
        "bogus", "read 0", "read 0 1k5", "read -P 300 0 1", "write -z -P 1 0 1", "write -u 0 1",
        "read 2M 512", "write 1M 1") + ["FILE"])
    assert_same(results)
    assert results[1][0] == 1


def test_successful_commands_exit_0(tmp_path):
    results = run_both(tmp_path, ["-f", "raw"] + cmds("write 0 4k", "read 0 4k") + ["FILE"])
    assert_same(results)
    assert results[1][0] == 0


def test_aio_requests_run_concurrently_then_flush(tmp_path):
    commands = [f"aio_write -P {i} {i * 64}k 64k" for i in range(1, 9)]
    commands += ["aio_flush"]
    commands += [f"aio_read -P {i} {i * 64}k 64k" for i in range(1, 9)]
    commands += ["aio_flush", "read -P 5 320k 64k"]
    results = run_both(tmp_path, ["-f", "raw"] + cmds(*commands) + ["FILE"])
    (qrc, qout, _, qimg), (src, sout, serr, simg) = results
    # Completion order of concurrent requests may differ; the set of reports may not.
    assert sorted(sout.splitlines()) == sorted(qout.splitlines())
    assert src == qrc == 0
    assert serr == ""
    assert simg.read_bytes() == qimg.read_bytes()


def test_truncate_and_length(tmp_path):
    results = run_both(tmp_path, ["-f", "raw"] + cmds("truncate 1.5M", "length", "map") + ["FILE"])
    assert_same(results)
    assert results[1][1].startswith("1.500 MiB\n")


def test_probed_raw_warns(tmp_path):
    results = run_both(tmp_path, cmds("write 0 512") + ["FILE"])
    assert_same(results)
    assert "probing guessed raw" in results[1][2]


def test_read_only_refuses_writes(tmp_path):
    results = run_both(tmp_path, ["-r", "-f", "raw"] + cmds("write 0 1", "read 0 1") + ["FILE"])
    assert_same(results)
    assert "strata io: Block node is read-only" in results[1][2]


def test_open_errors(tmp_path):
    missing = str(tmp_path / "missing.raw")
    for extra in (["-f", "raw", missing], [missing],
                  ["--image-opts", f"driver=raw,file.filename={missing}"]):
        q = subprocess.run([QEMU_IO, "-c", "read 0 1"] + extra, capture_output=True, text=True)
        s = subprocess.run([strata_bin(), "io", "-c", "read 0 1"] + extra,
                           capture_output=True, text=True)
        assert s.returncode == q.returncode == 1
        assert normalize(s.stderr) == normalize(q.stderr)


def test_image_opts_and_force_share(tmp_path):
    image = tmp_path / "img.raw"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", str(image), "1M"], check=True)
    subprocess.run([QEMU_IO, "-f", "raw", "-c", "write -P 9 0 64k", str(image)], check=True,
                   capture_output=True)
    s = subprocess.run([strata_bin(), "io", "-r", "-U", "--image-opts", "-c", "read -P 9 0 64k",
                        f"driver=raw,file.driver=file,file.filename={image}"],
                       capture_output=True, text=True)
    assert s.returncode == 0, s.stderr
    assert "read 65536/65536 bytes at offset 0" in s.stdout
    s = subprocess.run([strata_bin(), "io", "-n", "-f", "raw", "-c", "read -P 9 0 64k", str(image)],
                       capture_output=True, text=True)
    assert s.returncode == 0, s.stdout + s.stderr


def test_commands_from_stdin(tmp_path):
    image = tmp_path / "img.raw"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", str(image), "1M"], check=True)
    s = subprocess.run([strata_bin(), "io", "-f", "raw", str(image)],
                       input="write -P 2 0 4k\nread -P 2 0 4k\nquit\nread 0 1\n",
                       capture_output=True, text=True)
    assert s.returncode == 0
    assert normalize(s.stdout).count("ops; TIME") == 2


def strata_has_qcow2(tmp_path):
    image = tmp_path / "probe.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    s = subprocess.run([strata_bin(), "img", "info", str(image)], capture_output=True, text=True)
    return s.returncode == 0 and "file format: qcow2" in s.stdout


def test_qcow2_reads_match_qemu_io(tmp_path):
    if not strata_has_qcow2(tmp_path):
        pytest.skip("strata has no qcow2 driver yet (strata img info of a qcow2 image fails)")
    image = tmp_path / "img.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    subprocess.run([QEMU_IO, "-c", "write -P 5 64k 128k", "-c", "write -z 1M 64k", str(image)],
                   check=True, capture_output=True)
    commands = cmds("read -P 5 64k 128k", "read -P 0 0 64k", "read -P 0 1M 64k", "map", "length")
    q = subprocess.run([QEMU_IO, "-r"] + commands + [str(image)], capture_output=True, text=True)
    s = subprocess.run([strata_bin(), "io", "-r"] + commands + [str(image)],
                       capture_output=True, text=True)
    assert normalize(s.stdout) == normalize(q.stdout)
    assert s.returncode == q.returncode == 0
