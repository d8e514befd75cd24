"""The outbox keeps every record it said it stored, in order, once, until it is acknowledged."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from farworker.outbox import Outbox, OutboxError, make_record


def rec(tokens=5, session="s1"):
    return make_record(session, (0, 2), tokens=tokens, steps=1, started_at=time.time() - 1)


def test_add_pending_acknowledge_depth(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    records = [rec(tokens=i) for i in range(5)]
    for r in records:
        box.add(r)
    assert box.depth() == 5
    assert [r["id"] for r in box.pending(3)] == [r["id"] for r in records[:3]]
    assert box.pending(10) == records
    assert box.acknowledge([records[0]["id"], records[2]["id"], "not-there"]) == 2
    assert [r["id"] for r in box.pending()] == [records[i]["id"] for i in (1, 3, 4)]
    assert box.acknowledge([]) == 0
    assert box.depth() == 3


def test_same_id_twice_is_one_record(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    r = rec()
    box.add(r)
    box.add(dict(r, tokens=999))
    assert box.pending() == [r]


def test_durability_settings(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    box.add(rec())
    conn = box._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@pytest.mark.parametrize(
    "change,match",
    [
        ({"id": "nope"}, "UUID"),
        ({"blocks": [2, 2]}, "blocks"),
        ({"blocks": [0]}, "blocks"),
        ({"tokens": -1}, "tokens"),
        ({"steps": "3"}, "steps"),
        ({"started_at": "yesterday"}, "started_at"),
        ({"ended_at": 0.0}, "before"),
    ],
)
def test_bad_records_refused(tmp_path, change, match):
    box = Outbox(tmp_path / "outbox.sqlite")
    with pytest.raises(OutboxError, match=match):
        box.add(dict(rec(), **change))
    with pytest.raises(OutboxError, match="lacks session_id"):
        box.add({k: v for k, v in rec().items() if k != "session_id"})
    assert box.depth() == 0


def test_threads_and_listener(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    woken = []
    box.add_listener(lambda: woken.append(1))
    threads = [threading.Thread(target=lambda: [box.add(rec()) for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert box.depth() == 100
    assert len(woken) == 100


def test_two_processes_share_one_file(tmp_path):
    path = tmp_path / "outbox.sqlite"
    Outbox(path)
    code = textwrap.dedent(f"""
        import time
        from farworker.outbox import Outbox, make_record
        box = Outbox({str(path)!r})
        for i in range(50):
            box.add(make_record("p", (0, 1), i, 1, time.time()))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert Outbox(path).depth() == 100


def test_sigkill_loses_nothing_that_add_returned(tmp_path):
    """A writer reports each id after add() returns; SIGKILL it mid-stream; every reported id is on disk."""
    path = tmp_path / "outbox.sqlite"
    code = textwrap.dedent(f"""
        import sys, time
        from farworker.outbox import Outbox, make_record
        box = Outbox({str(path)!r})
        for i in range(100000):
            r = make_record("k", (0, 1), i, 1, time.time())
            box.add(r)
            sys.stdout.write(r["id"] + "\\n"); sys.stdout.flush()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    confirmed = []
    deadline = time.monotonic() + 30
    while len(confirmed) < 40 and time.monotonic() < deadline:
        confirmed.append(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    confirmed.extend(line.strip() for line in proc.stdout if line.strip())
    assert len(confirmed) >= 40
    on_disk = {r["id"] for r in Outbox(path).pending(limit=1_000_000)}
    assert set(confirmed) <= on_disk
    # and the file is a sound database after the kill
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_reject_moves_a_record_aside(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    good, bad = rec(), rec()
    box.add(bad)
    box.add(good)
    box.reject(bad["id"], "HTTP 422: invalid records.0.blocks")
    assert box.pending() == [good]
    assert box.depth() == 1
    assert box.rejected() == [dict(bad, rejected_reason="HTTP 422: invalid records.0.blocks")]


def test_an_open_segment_is_held_then_added_once(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    segment = rec(tokens=3)
    box.hold_open(segment)
    box.hold_open(dict(segment, tokens=7, steps=2))  # the next step replaces it
    assert box.open_segments() == [dict(segment, tokens=7, steps=2)]
    assert box.depth() == 0
    closed = dict(segment, tokens=9, steps=3)
    box.add(closed)  # the session closed: the record replaces its held segment in one transaction
    assert box.open_segments() == []
    assert box.pending() == [closed]
    assert box.recover_open_segments() == []
    assert box.pending() == [closed]
    assert box._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # back to FULL after holding


def test_recover_moves_held_segments_once_and_sets_aside_a_bad_one(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite")
    held = [rec(tokens=4, session="a"), rec(tokens=6, session="b")]
    for segment in held:
        box.hold_open(segment)
    box.hold_open(dict(rec(), blocks=[3, 1]))  # hold_open does not validate (serving path); recovery does
    woken = []
    box.add_listener(lambda: woken.append(1))
    assert sorted(r["tokens"] for r in box.recover_open_segments()) == [4, 6]
    assert sorted(r["id"] for r in box.pending()) == sorted(r["id"] for r in held)
    assert box.open_segments() == [] and woken == [1]
    assert "unreadable open segment" in box.rejected()[0]["rejected_reason"]
    assert box.recover_open_segments() == [] and box.depth() == 2


def test_sigkill_mid_session_loses_no_held_step(tmp_path):
    """A writer holds one segment open and reports each step after hold_open() returns; SIGKILL it; the
    next start's recovery bills every reported step, once."""
    path = tmp_path / "outbox.sqlite"
    code = textwrap.dedent(f"""
        import sys, time
        from farworker.outbox import Outbox, make_record
        box = Outbox({str(path)!r})
        segment = make_record("k", (0, 1), 0, 0, time.time())
        for step in range(1, 1000000):
            segment.update(tokens=step, steps=step, ended_at=time.time())
            box.hold_open(segment)
            sys.stdout.write(f"{{step}}\\n"); sys.stdout.flush()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    confirmed = 0
    deadline = time.monotonic() + 30
    while confirmed < 200 and time.monotonic() < deadline:
        confirmed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    confirmed = max([confirmed, *(int(line) for line in proc.stdout if line.strip())])
    assert confirmed >= 200
    recovered = Outbox(path).recover_open_segments()
    assert len(recovered) == 1 and recovered[0]["steps"] >= confirmed
    assert Outbox(path).pending() == recovered
