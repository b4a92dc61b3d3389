"""5. Plugin faults: a plugin whose hooks raise, installed as a distribution of its own.

The plugin ``saboteur`` (a module plus a ``*.dist-info`` with its entry point,
on PYTHONPATH) is loaded beside the four reference plugins. Its behaviour
comes from ``SABOTEUR_MODE``:

* ``operational``: requests whose prompt carries ``opfail:<hook>`` get an
  OperationalError from that hook (``ksi_enqueue``, ``ksi_select_provider``,
  ``ksi_handle_failure``, ``ksi_record_usage``). Exactly those requests end
  with an error result naming it; every other request, in the same sessions
  too, ends ok, in order; exit 1, no traceback.
* ``programming``: ``ksi_record_usage`` raises KeyError on its 20th call.
  ``ksi-host run`` exits 70 with a traceback naming the plugin and the hook;
  the database passes ``PRAGMA integrity_check``; the same command without
  the plugin completes the batch: every request one ok result, nothing
  stored sent again, the ledger matching the server's answers.
* ``startup``: ``ksi_startup`` raises: exit 70 naming plugin and hook; the
  queue, started before it, was shut down (it no longer claims the database).
"""

from __future__ import annotations

import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rel import (
    PLUGINS,
    by_request,
    check_session_order,
    deployment,
    env,
    fake_dist,
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

SABOTEUR = '''
import os

from ksi_host import ProviderInfo, hookimpl
from ksi_host.errors import OperationalError, ValidationError

MODE = os.environ.get("SABOTEUR_MODE", "")
CRASH_AT = 20


class HookRefused(OperationalError):
    """The saboteur refuses, operationally."""


def marked(request, hook):
    return MODE == "operational" and any(
        f"opfail:{hook}" in m["content"] for m in request.messages if isinstance(m.get("content"), str))


class Plugin:
    def __init__(self):
        self.usage_calls = 0

    @hookimpl
    def ksi_startup(self, host):
        if MODE == "startup":
            raise RuntimeError("saboteur: cannot start")

    @hookimpl(tryfirst=True)
    def ksi_enqueue(self, request):
        if marked(request, "enqueue"):
            raise ValidationError("metadata", "refused by the saboteur")
        return None

    @hookimpl
    def ksi_list_providers(self, model):
        # ranked before every other provider plugin (priority 0), so the host asks it first
        return [ProviderInfo("saboteur", model or "*", "saboteur", priority=0)]

    @hookimpl
    def ksi_select_provider(self, request):
        if marked(request, "select"):
            raise HookRefused("the saboteur selects nothing for this one")
        return None

    @hookimpl(tryfirst=True)
    def ksi_handle_failure(self, request):
        if marked(request, "failure"):
            raise HookRefused("the saboteur has no policy for this failure")
        return None

    @hookimpl
    def ksi_record_usage(self, request, call):
        if marked(request, "usage"):
            raise HookRefused("the saboteur will not record this call")
        if MODE == "programming":
            self.usage_calls += 1
            if self.usage_calls == CRASH_AT:
                raise KeyError("saboteur bug")
'''

MARKED = {  # request id -> (hook, the error type its result must name)
    "r0016": ("enqueue", "ValidationError"),
    "r0025": ("select", "HookRefused"),
    "r0034": ("failure", "HookRefused"),
    "r0043": ("usage", "HookRefused"),
}
N, SESSIONS = 80, 8
N_CRASH = 48  # the programming-error run: the 20th recorded call crashes it


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return fake_dist(tmp_path / "site", "ksi_rel_saboteur", SABOTEUR, {"saboteur": "ksi_rel_saboteur:Plugin"})


def setup_batch(tmp_path: Path, server: Any) -> tuple[list[dict[str, Any]], Path, Path]:
    server.delay_s = 0.02
    server.set_faults(faults_by_model={"flaky": "500"})
    reqs = session_requests(N, SESSIONS, "pf-model")
    for r in reqs:
        if r["request_id"] in MARKED:
            hook = MARKED[r["request_id"]][0]
            sid, k, rid = r["prompt"].split()
            r["prompt"] = f"{sid} {k} opfail:{hook} {rid}"
            if hook == "failure":
                r["model"] = "pf-flaky"  # its upstream answers 500: the failure hook is asked
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("local", "pf-model", server.url),
                          deployment("flaky", "pf-flaky", server.url, upstream="flaky"))
    return reqs, requests, config


def test_operational_errors_from_hooks_fail_only_their_request(tmp_path: Path, server: Any, site: Path) -> None:
    reqs, requests, config = setup_batch(tmp_path, server)
    out, db = tmp_path / "results.jsonl", tmp_path / "ksi.db"
    ran = ksi(run_args(requests, out, db, config, "--concurrency", "4"),
              environ=env(plugins=PLUGINS + ",saboteur", site=site, extra={"SABOTEUR_MODE": "operational"}))
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
    final = {r["request_id"]: r for r in results(out)}
    assert sorted(final) == sorted(r["request_id"] for r in reqs)
    for rid, r in final.items():
        if rid in MARKED:
            hook, error_type = MARKED[rid]
            assert r["status"] == "error" and r["error"]["type"] == error_type, (hook, r)
            assert "saboteur" in r["error"]["message"]
        else:
            assert r["status"] == "ok", r
    assert check_session_order(server.arrivals) == SESSIONS
    arrived = by_request(server.arrivals)
    assert "r0016" not in arrived and "r0025" not in arrived  # refused before any upstream call
    assert [a.fault for a in arrived["r0034"]] == ["500"]
    # the ledger still has every call the server received (ksi-tokens recorded r0043's before the saboteur
    # refused to; r0034's 500 is a row without usage)
    rows = Counter(r["request_id"] for r in ledger(db))
    assert rows == Counter(request_of(a) for a in server.arrivals)
    assert rows == {rid: 1 for rid in final if rid not in MARKED or rid in ("r0034", "r0043")}


def test_programming_error_in_a_hook_stops_the_run_and_a_rerun_without_it_completes(
        tmp_path: Path, server: Any, site: Path) -> None:
    reqs = session_requests(N_CRASH, SESSIONS, "pf-model")
    server.delay_s = 0.02
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("local", "pf-model", server.url))
    out, db = tmp_path / "results.jsonl", tmp_path / "ksi.db"
    args = run_args(requests, out, db, config, "--concurrency", "4")

    crashed = ksi(args, environ=env(plugins=PLUGINS + ",saboteur", site=site, extra={"SABOTEUR_MODE": "programming"}))
    assert crashed.returncode == 70, crashed.stderr[-3000:]
    err = crashed.stderr
    assert "Traceback" in err and "KeyError: 'saboteur bug'" in err
    assert "raised by plugin 'saboteur' in hook ksi_record_usage" in err
    assert "stored work resumes on the next run" in err
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = stored_final(db)
    assert 0 < len(stored) < N_CRASH
    first_arrivals = list(server.arrivals)
    in_flight = {request_of(a) for a in first_arrivals} - stored

    rerun = ksi(args, environ=env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = results(out)
    assert sorted(r["request_id"] for r in final) == sorted(r["request_id"] for r in reqs)
    assert Counter(r["status"] for r in final) == {"ok": N_CRASH}
    again = {request_of(a) for a in server.arrivals[len(first_arrivals):]}
    assert not again & stored and again & in_flight == in_flight
    assert check_session_order(server.arrivals) == SESSIONS
    # the ledger: a row per OK answer, but for calls cut short when the crash stopped the run (in flight): those
    # are rows of unknown outcome (answered or not, sent or not), at most one per request unfinished then
    answers = Counter(request_of(a) for a in server.arrivals if a.fault == "ok")
    rows = Counter(r["request_id"] for r in ledger(db) if r["outcome"] != "unknown")
    unknown = Counter(r["request_id"] for r in ledger(db) if r["outcome"] == "unknown")
    for rid, n in answers.items():
        assert n - (1 if rid in in_flight else 0) <= rows[rid] <= n, (rid, n, rows[rid])
        assert rows[rid] + unknown[rid] >= n, (rid, n, rows[rid], unknown[rid])
    unfinished = {r["request_id"] for r in reqs} - stored
    assert set(unknown) <= unfinished and set(unknown.values()) <= {1}, unknown


def test_programming_error_at_startup(tmp_path: Path, site: Path) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", [{"model": "mock/m", "prompt": "hello"}])
    config = tmp_path / "empty.toml"
    config.write_text("")
    args = [sys.executable, "-m", "ksi_host.cli", "run", str(requests), "--out", str(tmp_path / "out.jsonl"),
            "--db", str(tmp_path / "ksi.db"), "--config", str(config)]
    ran = ksi(args, environ=env(plugins=PLUGINS + ",saboteur", site=site, extra={"SABOTEUR_MODE": "startup"}))
    assert ran.returncode == 70, ran.stderr
    assert "RuntimeError: saboteur: cannot start" in ran.stderr
    assert "raised by plugin 'saboteur' in hook ksi_startup" in ran.stderr
    with sqlite3.connect(tmp_path / "ksi.db") as con:  # the plugins that had started were shut down: no owner left
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("SELECT COUNT(*) FROM ksi_queue_owner").fetchone() == (0,)
