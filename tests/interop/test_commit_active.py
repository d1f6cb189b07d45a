"""block-commit of the active layer on strata and qemu-storage-daemon (QEMU iotest 040's active
cases, built on the mirror job): READY once the base holds what the layers above it hold,
guest writes through an NBD export keep landing in the base too, and job-complete makes the
base the active layer (the export now writes to it). The base is opened read-only with
auto-read-only: it is reopened read-write for the job and stays so after the pivot; a
cancelled commit leaves it read-only again.
"""

from helpers import delete_export_after_clients_left
from test_backup_jobs import compare, qio, run_cmd, start_nbd, through
from test_commit import add_chain_ro_base
from test_mirror import mirror_until_ready, nodes
from test_stream import check_clean, make_chain

MiB = 1 << 20

def base_file_nodes(q, base):
    return [n for n in q.ok("query-named-block-nodes") if n["file"] == base]


def test_active_commit_ready_complete_pivots_to_base(daemon):
    d = daemon()
    q = d.qmp
    base, mid, top, expected = make_chain(d)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}})
    uri = start_nbd(d, "top")
    assert all(n["ro"] for n in base_file_nodes(q, base))
    events, ready = mirror_until_ready(q, {"job-id": "c", "device": "top"},
                                       command="block-commit")
    assert [e for e in events if isinstance(e, str)] == ["created", "running", "ready"], events
    assert len(ready) == 1 and ready[0][1]["type"] == "commit", ready
    assert ready[0][1]["len"] == ready[0][1]["offset"] > 0, ready
    info = q.ok("query-block-jobs")
    assert len(info) == 1 and info[0]["type"] == "commit" and "actively-synced" not in info[0]
    # The base is writable for the job.
    assert not any(n["ro"] for n in base_file_nodes(q, base))
    qio("-f", "raw", "-c", "write -P 0x61 3M 1M", uri)
    r, before = run_cmd(q, "job-complete", {"id": "c"})
    assert r == {"return": {}}, r
    events = through(q, before, "null")
    assert [e for e in events if isinstance(e, str)] == [
        "waiting", "pending", "concluded", "null"], events
    completed = [e[1] for e in events if isinstance(e, tuple)]
    assert [c["type"] for c in completed] == ["commit"] and "error" not in completed[0]
    # The export writes to the base now, which stays writable.
    exported = q.ok("query-block-exports")[0]["node-name"]
    assert exported != "top" and nodes(q)[exported]["file"] == base, exported
    assert not any(n["ro"] for n in base_file_nodes(q, base))
    qio("-f", "raw", "-c", "write -P 0x62 0 64k", "-c", "read -P 0x61 3M 1M", uri)
    assert "return" in delete_export_after_clients_left(q, "exp-top")
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(base)
    qio("-f", "raw", "-c", "write -P 0x61 3M 1M", "-c", "write -P 0x62 0 64k", expected)
    r = compare(base, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cancelled_active_commit_leaves_the_base_read_only(daemon):
    d = daemon()
    q = d.qmp
    base, mid, top, expected = make_chain(d)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}})
    mirror_until_ready(q, {"job-id": "c", "device": "top", "auto-dismiss": False},
                       command="block-commit")
    r, before = run_cmd(q, "job-cancel", {"id": "c"})
    assert r == {"return": {}}, r
    events = through(q, before, "concluded")
    assert [e for e in events if isinstance(e, str)] == ["aborting", "concluded"], events
    assert [e[0] for e in events if isinstance(e, tuple)] == ["BLOCK_JOB_CANCELLED"]
    q.ok("job-dismiss", {"id": "c"})
    assert all(n["ro"] for n in base_file_nodes(q, base))
    assert [n for n in nodes(q).values() if n["drv"] == "mirror_top"] == []
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(base)
    r = compare(top, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def test_active_commit_into_a_middle_layer_with_a_filter_name(daemon):
    d = daemon()
    q = d.qmp
    base, mid, top, expected = make_chain(d)
    q.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "filename": top}})
    events, ready = mirror_until_ready(
        q, {"job-id": "c", "device": "top", "base": mid, "filter-node-name": "ctop"},
        command="block-commit")
    assert nodes(q)["ctop"]["drv"] == "mirror_top"
    r, before = run_cmd(q, "job-complete", {"id": "c"})
    assert r == {"return": {}}, r
    through(q, before, "null")
    assert "ctop" not in nodes(q)
    q.ok("blockdev-del", {"node-name": "top"})
    check_clean(mid)
    r = compare(mid, expected)
    assert r.returncode == 0, r.stdout + r.stderr


def test_active_commit_without_auto_read_only_fails_like_qemu(daemon):
    d = daemon()
    base, mid, top, _ = make_chain(d)
    add_chain_ro_base(d.qmp, base, mid, top, auto_read_only=False)
    r = d.qmp.cmd_args("block-commit", {"job-id": "c", "device": "top"})
    assert "error" in r and "read-only" in r["error"]["desc"], r
    assert d.qmp.ok("query-block-jobs") == []
    assert [n for n in nodes(d.qmp).values() if n["drv"] == "mirror_top"] == []
