"""The ledger across SIGKILLs: every call the upstream received is one ledger row.

240 requests over 24 sessions, concurrency 8, against the local server (answers after
50 ms; 10% 429 and 5% 500, which report no usage). ``ksi-host run`` is killed with
SIGKILL three times while calls are in flight, then run to the end. Each kill comes at a
moment when every one of the 8 workers waits on a call the server holds (the server is
switched to hold every new call, and the kill follows once 8 are held): those 8 calls
were received upstream and their answers are never seen. Checked:

* between a kill and the next run, ``ksi-host usage --json`` and ``ksi-host status
  --json`` (read-only) report the 8 calls as of unknown outcome and in flight, and leave
  their rows ``sent``;
* the next run's start-up turns them into ``unknown``;
* at the end, the ledger's calls (ok + errors + unknown) equal the server's hits, request
  by request; the outcomes match what the server did (ok, 429, 500, held: unknown); the
  tokens equal what the server's answers reported and the results' usage; ``ksi-host
  usage --json`` counts the 24 unknown calls.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rel import (
    answered_usage,
    by_request,
    deployment,
    env,
    ksi,
    ledger,
    results,
    run_args,
    session_requests,
    write_config,
    write_requests,
)

N, SESSIONS, CONCURRENCY, KILLS, PROGRESS = 240, 24, 8, 3, 15
FAULTS = {"429": 0.1, "500": 0.05}
OUTCOMES = {"ok": "ok", "429": "RateLimited", "500": "ProviderUnavailable", "hang": "unknown"}


def wait_for(condition: Any, what: str, p: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert p.poll() is None, f"the run ended while waiting for {what}: {p.returncode}\n{p.stderr.read() if p.stderr else ''}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def outcomes(db: Path) -> Counter[str]:
    with sqlite3.connect(db) as con:
        return Counter(r[0] for r in con.execute("SELECT outcome FROM token_usage"))


def cli(command: str, db: Path, environ: dict[str, str], *more: str) -> Any:
    done = ksi([sys.executable, "-m", "ksi_host.cli", command, "--db", str(db), "--json", *more], environ=environ)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_call_the_upstream_received_is_a_ledger_row_across_kills(tmp_path: Path, server) -> None:
    server.delay_s = 0.05
    server.hang_s = 60.0  # a held call is answered long after its client died
    reqs = session_requests(N, SESSIONS, "kill-model")
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("local", "kill-model", server.url, timeout_s=30.0),
                          circuit={"failures_to_open": 1000})
    out, db = tmp_path / "results.jsonl", tmp_path / "ksi.db"
    args = run_args(requests, out, db, config, "--concurrency", str(CONCURRENCY))
    environ = env()

    for kill in range(KILLS):
        server.set_faults(rates=FAULTS, seed=kill)
        ok_before = server.counts["ok"]
        p = subprocess.Popen(args, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda start=ok_before: server.counts["ok"] >= start + PROGRESS, "progress", p)
            held_from = len(server.arrivals)
            server.set_faults(rates={"hang": 1.0})  # hold every new call: the workers stop one by one
            wait_for(lambda start=held_from: sum(a.fault == "hang" for a in server.arrivals[start:]) == CONCURRENCY,
                     f"{CONCURRENCY} held calls", p)
            p.send_signal(signal.SIGKILL)  # every worker waits on a held call: none is between its record and its call
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        assert p.returncode == -signal.SIGKILL
        assert outcomes(db)["sent"] == CONCURRENCY, outcomes(db)
        # read-only commands report the calls left sent, and do not settle them (a server may be running)
        total = _sum(cli("usage", db, environ))
        assert (total["unknown_calls"], total["in_flight_calls"]) == (kill * CONCURRENCY + CONCURRENCY, CONCURRENCY)
        usage = cli("status", db, environ)["usage"]
        assert (usage["unknown_calls"], usage["in_flight_calls"]) == (kill * CONCURRENCY + CONCURRENCY, CONCURRENCY)
        assert outcomes(db)["sent"] == CONCURRENCY

    server.set_faults(rates=FAULTS, seed=KILLS)
    last = ksi(args, environ=environ)
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"{CONCURRENCY} upstream call(s) sent by a process that stopped" in last.stderr

    final = results(out)
    assert sorted(r["request_id"] for r in final) == sorted(r["request_id"] for r in reqs)
    assert Counter(r["status"] for r in final) == {"ok": N}

    # one row per call the server received, request by request, with the outcome it had
    rows = ledger(db)
    assert len(rows) == server.hits
    arrivals = by_request(server.arrivals)
    for rid, calls in arrivals.items():
        mine = [r for r in rows if r["request_id"] == rid]
        assert sorted(r["outcome"] for r in mine) == sorted(OUTCOMES[a.fault] for a in calls), rid
    assert set(arrivals) == {r["request_id"] for r in rows}
    assert outcomes(db) == {OUTCOMES[f]: n for f, n in server.counts.items()}
    assert outcomes(db)["unknown"] == KILLS * CONCURRENCY and server.counts["429"] > 0 and server.counts["500"] > 0
    # the tokens are those of the answers the host received, and the results' usage
    answered = answered_usage(server.arrivals)
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sum(r[k] or 0 for r in rows) == answered[k] == sum(r["usage"][k] for r in final)
    assert all(r["total_tokens"] is None for r in rows if r["outcome"] != "ok")

    report = cli("usage", db, environ, "--by", "session")
    assert len(report) == SESSIONS
    total = _sum(report)
    assert total["calls"] == server.hits
    assert (total["unknown_calls"], total["in_flight_calls"]) == (KILLS * CONCURRENCY, 0)
    assert total["total_tokens"] == answered["total_tokens"]
    assert sum(g["requests"] for g in report) == N
    table = ksi([sys.executable, "-m", "ksi_host.cli", "usage", "--db", str(db)], environ=environ)
    assert f"{KILLS * CONCURRENCY} calls of unknown outcome, possibly billed" in table.stdout, table.stdout


def _sum(report: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("calls", "unknown_calls", "in_flight_calls", "prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(g[k] for g in report) for k in keys}
