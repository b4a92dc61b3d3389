"""An audit plugin written from the hookspecs alone sees every attempt and every final result of a faulty batch.

The plugin is installed as its own distribution (by PYTHONPATH) beside the four reference plugins and writes
one JSON line per observer call. The batch runs against the local server with 429s (no usage), 500s, hangs past
the timeout, a model nothing serves and a request refused as bad input by the provider; then every result line
must have exactly one ``ksi_request_finished`` with its status, the same attempts in ``ksi_attempt_finished``,
and every call the server received must be an observed attempt with a call.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rel import deployment, env, fake_dist, ksi, results, run_args, session_requests, write_config, write_requests

AUDIT = '''
import json
import os

from ksi_host import hookimpl


class Audit:
    """Written from ksi_host/hookspecs.py alone: two observer hooks, one JSON line each."""

    def __init__(self):
        self.out = open(os.environ["AUDIT_LOG"], "a", encoding="utf-8")

    def _write(self, record):
        self.out.write(json.dumps(record) + "\\n")
        self.out.flush()

    @hookimpl
    def ksi_attempt_finished(self, request, attempt, error, call):
        self._write({"hook": "attempt", "request_id": request.request_id, "number": attempt.number,
                     "provider": attempt.provider, "error": error and error.type,
                     "call": call and {"call_id": call.call_id, "outcome": call.outcome,
                                       "tokens": call.usage and call.usage.total_tokens}})

    @hookimpl
    def ksi_request_finished(self, request, result):
        self._write({"hook": "request", "request_id": result.request_id, "status": result.status,
                     "attempts": [a.error_type for a in result.attempts], "error": result.error and result.error["type"]})
'''


def test_an_audit_plugin_sees_every_attempt_and_every_result_of_a_faulty_batch(tmp_path: Path, server: Any) -> None:
    server.set_faults(rates={"429": 0.2, "500": 0.15, "hang": 0.03}, seed=7, faults_by_model={"refuses": "400"})
    site = fake_dist(tmp_path / "site", "ksi_rel_audit", AUDIT, {"audit": "ksi_rel_audit:Audit"}, dist="ksi-rel-audit")
    reqs = session_requests(60, 6, "audit-model")
    reqs += [{"request_id": "unserved", "model": "nobody-serves-this", "prompt": "hi"},
             {"request_id": "refused", "model": "audit-refused", "prompt": "hi"}]
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("local", "audit-model", server.url, timeout_s=1.0),
                          deployment("refusing", "audit-refused", server.url, upstream="refuses"),
                          retry={"max_attempts": 6})
    log, out, db = tmp_path / "audit.jsonl", tmp_path / "out.jsonl", tmp_path / "k.db"
    ran = ksi(run_args(requests, out, db, config),
              environ=env(plugins="queue,litellm,retry,tokens,audit", site=site, extra={"AUDIT_LOG": str(log)}))
    assert ran.returncode == 1, ran.stderr[-2000:]  # some requests failed: the unserved and refused ones at least
    final = {r["request_id"]: r for r in results(out)}
    assert len(final) == len(reqs)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    finished = [r for r in records if r["hook"] == "request"]
    attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["hook"] == "attempt":
            attempts[r["request_id"]].append(r)

    # every final result, exactly once, with its status and attempts
    assert Counter(r["request_id"] for r in finished) == Counter({rid: 1 for rid in final})
    for r in finished:
        result = final[r["request_id"]]
        assert r["status"] == result["status"]
        assert r["attempts"] == [a["error_type"] for a in result["attempts"]]
        # every attempt, in order, with its error or none
        assert [(a["number"], a["error"]) for a in attempts[r["request_id"]]] == [
            (a["number"], a["error_type"]) for a in result["attempts"]]
    assert final["unserved"]["error"]["type"] in ("NoProviderError", "ValidationError")
    assert attempts["unserved"][0]["call"] is None  # nothing was sent: no call
    assert final["refused"]["error"]["type"] == "BadRequest"
    # every call the server received is an observed attempt with its call
    calls = [a["call"] for rid in attempts for a in attempts[rid] if a["call"] is not None]
    assert len(calls) == server.hits and len({c["call_id"] for c in calls}) == len(calls)
    outcomes = Counter(c["outcome"] for c in calls)
    assert outcomes["ok"] == sum(1 for r in final.values() if r["status"] == "ok")
    assert outcomes["RateLimited"] > 0 and outcomes["ProviderUnavailable"] > 0  # the faults were met
