"""blockdev-backup as a `transaction` action on strata and qemu-storage-daemon: with a bitmap
added in the same transaction (the start of an incremental backup chain), rolled back by a later
failing action, and completion-mode=grouped where one job's failure cancels the other.
"""

import time

from test_backup_jobs import (SIZE, add_qcow2, add_raw, blkdebug_target, collect_until, compare,
                              make_raw, make_source, run_cmd)


def job_histories(q, job_ids, timeout=30.0):
    """JOB_STATUS_CHANGE statuses and BLOCK_JOB_* events per job until every job in `job_ids`
    reached "null"."""
    history = {job: [] for job in job_ids}
    done = set()

    def take(ev):
        data = ev.get("data", {})
        if ev["event"] == "JOB_STATUS_CHANGE" and data.get("id") in history:
            history[data["id"]].append(data["status"])
            if data["status"] == "null":
                done.add(data["id"])
        elif ev["event"].startswith("BLOCK_JOB_") and data.get("device") in history:
            history[data["device"]].append((ev["event"], data.get("error")))

    for ev in list(q.events_before_reply) + list(q.events):
        if not ev.get("_consumed"):
            ev["_consumed"] = True
            take(ev)
    deadline = time.monotonic() + timeout
    while done != set(job_ids):
        remaining = deadline - time.monotonic()
        assert remaining > 0, "stuck: %r" % (history,)
        msg = q.recv_msg(remaining)
        if isinstance(msg, dict) and "event" in msg:
            msg["_consumed"] = True
            take(msg)
        else:
            q._pending.append(msg)
    return history


def test_bitmap_add_and_backup_in_one_transaction(daemon):
    d = daemon()
    q = d.qmp
    src = make_source(d)
    add_qcow2(q, "src", src)
    tgt = make_raw(d)
    add_raw(q, "tgt", tgt)
    r, before = run_cmd(q, "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "j1", "device": "src", "target": "tgt",
                                             "sync": "full"}}]})
    assert r == {"return": {}}, r
    assert before == ["created", "running", "paused", "running"], before
    after = collect_until(q, "null")
    assert after[-1] == "null" and after[-2] == "concluded", after
    nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}
    assert [b["name"] for b in nodes["src"]["dirty-bitmaps"]] == ["b0"]
    q.ok("blockdev-del", {"node-name": "tgt"})
    q.ok("blockdev-del", {"node-name": "src"})
    assert compare(src, tgt).returncode == 0


def test_failing_action_rolls_the_backup_back(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_raw(q, "tgt", make_raw(d))
    r, before = run_cmd(q, "transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "j1", "device": "src", "target": "tgt",
                                             "sync": "full"}},
        {"type": "abort", "data": {}}]})
    assert r["error"]["desc"] == "Transaction aborted using Abort action", r
    assert before == ["created", "aborting", "concluded", "null"], before
    assert q.ok("query-jobs") == []
    nodes = {n["node-name"]: n for n in q.ok("query-named-block-nodes")}
    assert not nodes["src"].get("dirty-bitmaps")
    # Argument errors name the action's member and create nothing.
    r, before = run_cmd(q, "transaction", {"actions": [
        {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "src", "sync": "full"}}]})
    assert r["error"]["desc"] == "Parameter 'actions[0].data.target' is missing", r
    assert before == []


def test_grouped_failure_cancels_the_other_job(daemon):
    d = daemon()
    q = d.qmp
    add_qcow2(q, "src", make_source(d))
    add_raw(q, "good", make_raw(d, "good.raw"))
    blkdebug_target(q, make_raw(d, "bad.raw"), 5)
    actions = [
        {"type": "blockdev-backup", "data": {"job-id": "ok", "device": "src", "target": "good",
                                             "sync": "full"}},
        {"type": "blockdev-backup", "data": {"job-id": "bad", "device": "src", "target": "tgt",
                                             "sync": "full"}}]
    # An action that cannot be grouped fails the transaction before any job exists.
    r, before = run_cmd(q, "transaction", {
        "actions": actions + [{"type": "block-dirty-bitmap-add",
                               "data": {"node": "src", "name": "b1"}}],
        "properties": {"completion-mode": "grouped"}})
    assert r["error"]["desc"] == ("Action 'block-dirty-bitmap-add' does not support "
                                  "transaction property completion-mode = grouped"), r
    assert before == []
    r = q.cmd_args("transaction", {"actions": actions,
                                   "properties": {"completion-mode": "grouped"}})
    assert r == {"return": {}}, r
    history = job_histories(q, ["ok", "bad"])
    assert ("BLOCK_JOB_COMPLETED", "Input/output error") in history["bad"], history
    assert ("BLOCK_JOB_CANCELLED", None) in history["ok"], history
    for job in ("ok", "bad"):
        assert "aborting" in history[job] and history[job][-2:] == ["concluded", "null"], history
        assert "pending" not in history[job], history
    assert q.ok("query-jobs") == []
