"""Kill a real serving process with SIGKILL mid-queue, restart it on the same database."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("sigkill_worker.py")
N, SESSIONS, DELAY_S, CONCURRENCY = 40, 4, 0.03, 3


def worker(db: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), str(db), str(log), str(N), str(SESSIONS), str(DELAY_S),
                             str(CONCURRENCY)], stdout=subprocess.PIPE, text=True)


def statuses(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(str(db))
    try:
        return dict(conn.execute("SELECT request_id, status FROM ksi_queue_requests"))
    finally:
        conn.close()


def calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_sigkill_mid_queue_then_restart_finishes_everything_once_in_order(tmp_path: Path) -> None:
    db, log = tmp_path / "queue.db", tmp_path / "calls.log"
    first = worker(db, log)
    try:
        assert first.stdout.readline().split()[0] == "RESTORED"
        assert first.stdout.readline().strip() == "SUBMITTED"  # all N are durable now
        deadline = time.monotonic() + 20
        while True:  # wait (in real time: this is another process) until some results are stored
            done = [s for s in statuses(db).values() if s == "ok"]
            if len(done) >= 2 * CONCURRENCY and len(calls(log)) > len(done):
                break
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stdout.close()
    assert first.returncode == -signal.SIGKILL

    at_kill = statuses(db)
    sent_before = calls(log)
    final_before = {rid for rid, s in at_kill.items() if s == "ok"}
    unfinished = {rid for rid, s in at_kill.items() if s in ("queued", "running")}
    assert len(at_kill) == N and final_before and unfinished  # killed mid-queue
    assert final_before | unfinished == set(at_kill)

    second = subprocess.run([sys.executable, str(WORKER), str(db), str(log), str(N), str(SESSIONS), str(DELAY_S),
                             str(CONCURRENCY)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    out = second.stdout.split("\n")
    assert out[0] == f"RESTORED {len(unfinished)}"
    done = json.loads(next(line for line in out if line.startswith("DONE "))[5:])
    assert done == dict.fromkeys(at_kill, "ok")

    # every request ends with exactly one final result, stored
    conn = sqlite3.connect(str(db))
    stored = conn.execute("SELECT request_id, status, result_text FROM ksi_queue_requests ORDER BY seq").fetchall()
    conn.close()
    assert len(stored) == N and all(s == "ok" and text == f"done {rid}" for rid, s, text in stored)

    all_calls = calls(log)
    sent_after = all_calls[len(sent_before):]
    assert not final_before & set(sent_after)  # a stored result is never sent again
    assert set(all_calls) == set(at_kill)  # every request reached the provider
    resent = {rid for rid in sent_after if rid in sent_before}
    assert resent <= unfinished and len(resent) <= SESSIONS  # at most the one running per session is sent twice
    assert all(all_calls.count(rid) == 1 for rid in set(all_calls) - resent)

    for s in range(SESSIONS):  # each session's calls in submission order, across the kill
        steps = [int(rid.split("-")[1]) for rid in all_calls if rid.startswith(f"s{s}-")]
        assert steps == sorted(steps) and sorted(set(steps)) == list(range(N // SESSIONS))
