"""1. Crash: SIGKILL ``ksi-host run`` mid-batch, rerun on the same database.

500 requests over 25 sessions, concurrency 12, against the local server. The
first run is killed with SIGKILL once the server has answered 150 calls; the
second run, same command and database, completes the batch. Checked:

* every request has exactly one result, and it is ok;
* a request whose result was stored (committed in ``ksi_queue_requests``)
  before the kill is never sent upstream again; the requests sent again are
  those in flight at the kill (sent, result not stored: running, or finished
  with its result's commit under way), each at most once more;
* each session's requests reached the server in order, across the kill;
* the ledger matches the upstream calls. What "matches" means across a
  SIGKILL: a call is recorded (``sent``) before it is sent, and the rerun's
  start-up turns the calls whose ending nobody saw into ``unknown`` rows: the
  server may have answered them (the answer never reached a durable write) or,
  killed between the record and the send, never received them. So: every other
  ledger row is one OK answer of the server for that request, with the same
  tokens (no row without a call, none twice); the unknown rows are calls of
  requests unfinished at the kill, at most one per such request, and each OK
  answer without an ``ok`` row is one of them; every other request has exactly
  as many rows as OK answers.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from rel import (
    by_request,
    check_session_order,
    deployment,
    env,
    ksi,
    ledger,
    request_of,
    results,
    run_args,
    session_requests,
    stored_final,
    write_config,
    write_requests,
)

N, SESSIONS, CONCURRENCY, KILL_AFTER = 500, 25, 12, 150


def test_sigkill_mid_batch_then_rerun(tmp_path: Path, server) -> None:
    server.delay_s = 0.02  # calls take a while: some are in flight at the kill
    reqs = session_requests(N, SESSIONS, "rel-model")
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("local", "rel-model", server.url))
    out, db = tmp_path / "results.jsonl", tmp_path / "ksi.db"
    args = run_args(requests, out, db, config, "--concurrency", str(CONCURRENCY))
    environ = env()

    p = subprocess.Popen(args, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while server.counts["ok"] < KILL_AFTER and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.poll() is None, f"the run ended before the kill: {p.returncode}\n{p.stderr.read() if p.stderr else ''}"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    time.sleep(0.3)  # let the server finish answering what was in flight
    first_arrivals = list(server.arrivals)
    stored = stored_final(db)
    sent_first = {request_of(a) for a in first_arrivals}
    in_flight = sent_first - stored
    assert stored <= sent_first and len(stored) < N
    # in flight: running (at most the concurrency) or finished with its result's commit under way (the queue
    # frees the slot when host.execute returns; the session moves on only once the result is committed)
    assert len(in_flight) <= 2 * CONCURRENCY, sorted(in_flight)

    second = ksi(args, environ=environ)
    assert second.returncode == 0, second.stderr[-3000:]

    # every request has exactly one result, and it is ok
    final = results(out)
    assert sorted(r["request_id"] for r in final) == sorted(r["request_id"] for r in reqs)
    assert Counter(r["status"] for r in final) == {"ok": N}

    # stored answers are never sent again; only requests in flight at the kill are, at most once more
    later = server.arrivals[len(first_arrivals):]
    sent_again = {request_of(a) for a in later} & sent_first
    assert not sent_again & stored, sorted(sent_again & stored)
    assert sent_again <= in_flight
    per_request = by_request(server.arrivals)
    assert set(per_request) == {r["request_id"] for r in reqs}
    for rid, calls in per_request.items():
        assert len(calls) <= (2 if rid in in_flight else 1), (rid, [(a.t, a.fault) for a in calls])
    assert check_session_order(server.arrivals) == SESSIONS

    # the ledger matches the upstream calls (see the module docstring)
    all_rows = ledger(db)
    unknown = Counter(r["request_id"] for r in all_rows if r["outcome"] == "unknown")
    assert set(unknown) <= {r["request_id"] for r in reqs} - stored and set(unknown.values()) <= {1}, unknown
    assert all(r["total_tokens"] is None for r in all_rows if r["outcome"] == "unknown")
    rows = [r for r in all_rows if r["outcome"] != "unknown"]
    rows_by_request = Counter(r["request_id"] for r in rows)
    ok_answers = {rid: [a for a in calls if a.usage is not None] for rid, calls in per_request.items()}
    for r in rows:
        answer = ok_answers[r["request_id"]][0].usage
        assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (
            answer["prompt_tokens"], answer["completion_tokens"], answer["total_tokens"]), r
        assert r["outcome"] == "ok" and r["provider"] == "local"
    unrecorded = 0
    for rid, answers in ok_answers.items():
        missing = len(answers) - rows_by_request[rid]
        assert missing >= 0, f"{rid}: {rows_by_request[rid]} ledger rows for {len(answers)} answers"
        if rid in in_flight:
            assert missing <= unknown[rid], rid
        else:
            assert missing == 0, rid
        unrecorded += missing
    assert unrecorded <= len(in_flight)
    # the result files' usage is each request's final call's usage
    assert sum(r["usage"]["total_tokens"] for r in final) == sum(ok_answers[r["request_id"]][-1].usage["total_tokens"] for r in final)
