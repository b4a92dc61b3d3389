"""2. Fault soak: 25% 429 (with Retry-After), 20% 500, 3% hangs past the timeout.

240 requests over 24 sessions, one ``ksi-host run``; attempts time out after
2 s (a hang lasts 4 s; an answer takes milliseconds, so none is late even on
a loaded machine). Checked:

* every request ends ok (the retry plugin absorbs every fault; the circuit
  opens now and then, for 0.3 s, and selection waits for it);
* each session strictly in order, from the server's own arrival log: every
  call of a session's n-th request arrived after the OK answer to its
  (n-1)-th was sent;
* the ledger (``ksi-host usage --json`` and the ``token_usage`` table) equals
  what the server did: one row per call it received, the OK answers with their
  tokens, the errors without (they reported no usage), the hangs as calls of
  unknown outcome (a hang's late answer, sent after the client's timeout closed
  the connection, reaches nobody and its tokens are not counted);
* the results' attempts match the server's log call for call, and the call
  after a 429 came no sooner than its Retry-After (0.1 s).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from rel import (
    answered_usage,
    by_request,
    check_session_order,
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

N, SESSIONS = 240, 24


def test_fault_soak_all_ok_in_order_and_ledger_equals_server(tmp_path: Path, server) -> None:
    server.set_faults(rates={"429": 0.25, "500": 0.2, "hang": 0.03}, seed=1)
    reqs = session_requests(N, SESSIONS, "soak-model")
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("local", "soak-model", server.url, timeout_s=2.0),
                          queue={"concurrency": SESSIONS})
    out, db = tmp_path / "results.jsonl", tmp_path / "ksi.db"
    environ = env()
    ran = ksi(run_args(requests, out, db, config), environ=environ)
    assert ran.returncode == 0, ran.stderr[-3000:]

    counts = server.counts
    assert counts["429"] > 0 and counts["500"] > 0 and counts["hang"] > 0, counts  # the faults did happen
    final = results(out)
    assert sorted(r["request_id"] for r in final) == sorted(r["request_id"] for r in reqs)
    assert Counter(r["status"] for r in final) == {"ok": N}

    assert check_session_order(server.arrivals) == SESSIONS

    # the results' attempts that reached a deployment are the server's calls, one for one (the others
    # found every circuit open and made no call: no provider)
    calls = by_request(server.arrivals)
    kinds = {"429": "RateLimited", "500": "ProviderUnavailable", "hang": "ProviderTimeout", "ok": None}
    for r in final:
        seen = calls[r["request_id"]]
        made = [a for a in r["attempts"] if a["provider"] is not None]
        assert [a["error_type"] for a in made] == [kinds[a.fault] for a in seen], (r["attempts"], seen)
        assert seen[-1].fault == "ok"
        assert all("open circuit" in a["error_message"] for a in r["attempts"] if a["provider"] is None)
        for before, after in zip(seen, seen[1:], strict=False):  # a 429's Retry-After (0.1 s) is honoured
            if before.fault == "429":
                assert after.t - before.answered_at >= 0.1 - 0.005, (r["request_id"], after.t - before.answered_at)

    # the ledger equals what the server reported
    answered = answered_usage(server.arrivals)
    assert answered["calls"] == counts["ok"] == N
    rows = ledger(db)
    assert len(rows) == server.hits
    assert Counter(r["outcome"] for r in rows) == {
        "ok": counts["ok"], "RateLimited": counts["429"], "ProviderUnavailable": counts["500"], "unknown": counts["hang"]}
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sum(r[k] or 0 for r in rows) == answered[k]
    assert Counter(r["request_id"] for r in rows if r["outcome"] == "ok") == {r["request_id"]: 1 for r in reqs}
    usage = ksi([sys.executable, "-m", "ksi_host.cli", "usage", "--db", str(db), "--by", "session", "--json"],
                environ=environ)
    assert usage.returncode == 0, usage.stderr
    report = json.loads(usage.stdout)
    assert len(report) == SESSIONS
    assert sum(g["calls"] for g in report) == server.hits
    assert sum(g["unknown_calls"] for g in report) == counts["hang"]
    assert sum(g["requests"] for g in report) == N
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sum(g[k] for g in report) == answered[k]
