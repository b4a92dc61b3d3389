"""Several ``ksi-host run`` processes on one PostgreSQL database (ksi-postgres), against the local server.

Each host is a real ``python -m ksi_host.cli run`` process with ksi-queue and ksi-tokens loaded too
(``[postgres]`` takes their hooks over: they are not started), the OpenAI-compatible provider and
ksi-retry. The database is a fresh one in the test session's throw-away cluster; the local server runs
in a thread of this process, so its arrival log (which request arrived when, answered when, with what
usage) is read directly.

* three hosts, 3,000 requests over 300 sessions: every request one final result, each session's requests
  reach the upstream strictly in order, the ledger equals the server's counts, every host did work;
* SIGKILL one host while it has calls in flight: the others finish its requests after the lease time, and
  the only calls sent twice are the ones it had in flight (its ledger rows for them become ``unknown``);
* two hosts given the same request ids: each id reaches the upstream once, both results files agree;
* cancel and clear-session from a fourth process reach the host running the request; queued requests
  never reach the upstream; ``ksi-host status`` there shows every host.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ksi_host.testing.server import Arrival, OpenAIServer

PLUGINS = "queue,tokens,postgres,openai,retry"
MODEL = "pg-model"


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    s = OpenAIServer(delay_s=0.005, keep_bodies=True).start_in_thread()
    try:
        yield s
    finally:
        s.stop_thread()


def config(path: Path, url: str, *, lease_s: float = 2.0, concurrency: int = 16) -> Path:
    path.write_text(
        f'[postgres]\ndsn_env = "KSI_PG_DSN"\nlease_s = {lease_s}\npoll_s = 0.2\nconcurrency = {concurrency}\n\n'
        '[retry]\nbase_delay_s = 0.05\nmax_delay_s = 0.5\nmax_attempts = 5\nseed = 1\n\n'
        f'[[openai.deployments]]\nname = "local"\nmodel = "{MODEL}"\napi_base = "{url}"\napi_key_env = "KSI_IT_KEY"\n'
        'timeout_s = 30\n')
    return path


def env(dsn: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE", "KSI_HOST_CONFIG",
                                                          "KSI_HOST_DB", "PYTHONDONTWRITEBYTECODE")}
    e.update(KSI_PG_DSN=dsn, KSI_HOST_PLUGINS=PLUGINS, KSI_IT_KEY="sk-pg-test", OTEL_TRACES_EXPORTER="none")
    return e


def requests(path: Path, n: int, sessions: int, prefix: str) -> list[dict[str, Any]]:
    """``n`` requests round-robin over ``sessions`` sessions; each prompt says ``<session> <place> <request id>``."""
    out = []
    for i in range(n):
        sid, k, rid = f"{prefix}s{i % sessions:03d}", i // sessions, f"{prefix}{i:05d}"
        out.append({"request_id": rid, "model": MODEL, "session_id": sid, "prompt": f"{sid} {k} {rid}",
                    "agent_id": f"agent-{i % 3}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def start(tmp: Path, name: str, reqs: Path, cfg: Path, environ: dict[str, str], *more: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "ksi_host.cli", "run", str(reqs), "--out", str(tmp / f"{name}.jsonl"),
            "--db", str(tmp / f"{name}.db"), "--config", str(cfg), *more]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)


def finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def cli(command: str, tmp: Path, cfg: Path, environ: dict[str, str], *more: str) -> subprocess.CompletedProcess[str]:
    db = tmp / "cli.db"  # never created: a read-only command needs no local database when Postgres serves
    return subprocess.run([sys.executable, "-m", "ksi_host.cli", command, "--db", str(db), "--config", str(cfg), *more],
                          capture_output=True, text=True, env=environ, timeout=60)


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sql(dsn: str, query: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        con = await asyncpg.connect(dsn)
        try:
            return list(await con.fetch(query, *args))
        finally:
            await con.close()
    return asyncio.run(go())


def prompt(a: Arrival) -> str:
    assert a.body is not None
    return a.body["messages"][-1]["content"]


def by_request(arrivals: list[Arrival]) -> dict[str, list[Arrival]]:
    out: dict[str, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        out[prompt(a).split()[-1]].append(a)
    return out


def check_session_order(arrivals: list[Arrival]) -> int:
    """From the server's log: within a session, a request's calls arrive only after the answer to the previous
    request of the session was sent, never before a place that already started. Returns the sessions checked."""
    sessions: dict[str, list[Arrival]] = defaultdict(list)
    for a in sorted(arrivals, key=lambda a: a.t):
        sessions[prompt(a).split()[0]].append(a)
    for sid, seen in sessions.items():
        last_k, answered = -1, 0.0
        for a in seen:
            k = int(prompt(a).split()[1])
            assert k >= last_k, f"session {sid}: place {k} arrived after place {last_k} had started"
            if k > last_k:
                assert k == last_k + 1, f"session {sid}: place {k} arrived before place {last_k + 1}"
                assert a.t >= answered, f"session {sid}: place {k} arrived before the answer to place {last_k} was sent"
                last_k = k
            if a.answered_at is not None:
                answered = a.answered_at
    return len(sessions)


def check_ledger(dsn: str, arrivals: list[Arrival]) -> list[Any]:
    """The ledger's calls equal the server's hits request by request, but for calls of unknown outcome (a killed
    host's): a row written just before the kill may stand for a call that never left. Each request has one
    ``ok`` call; the tokens of the ok calls equal the server's answers to them."""
    rows = sql(dsn, "SELECT request_id, host_id, outcome, prompt_tokens, completion_tokens, total_tokens"
                    " FROM ksi_pg_token_usage")
    calls: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        calls[r["request_id"]].append(r)
    hits = by_request(arrivals)
    assert set(calls) == set(hits)
    for rid, mine in calls.items():
        unknown = sum(r["outcome"] == "unknown" for r in mine)
        assert sum(r["outcome"] == "ok" for r in mine) == 1, rid
        assert len(mine) - unknown <= len(hits[rid]) <= len(mine), rid
    ok_tokens = sum(r["total_tokens"] for r in rows if r["outcome"] == "ok")
    delivered = {rid: a[-1] for rid, a in hits.items()}  # the answer a host received: the last call's
    assert ok_tokens == sum(a.usage["total_tokens"] for a in delivered.values() if a.usage)
    return rows


def test_three_hosts_share_3000_requests_over_300_sessions(tmp_path: Path, server: OpenAIServer, postgres_dsn: str) -> None:
    cfg = config(tmp_path / "ksi.toml", server.url)
    environ = env(postgres_dsn)
    files = {name: requests(tmp_path / f"{name}-in.jsonl", 1000, 100, name) for name in ("a", "b", "c")}
    procs = {name: start(tmp_path, name, tmp_path / f"{name}-in.jsonl", cfg, environ) for name in files}
    for name, p in procs.items():
        code, err = finish(p)
        assert code == 0, f"host {name}: {err}"
    for name, reqs in files.items():
        out = results(tmp_path / f"{name}.jsonl")
        assert sorted(r["request_id"] for r in out) == sorted(r["request_id"] for r in reqs)
        assert all(r["status"] == "ok" for r in out)
    final = sql(postgres_dsn, "SELECT status, count(*) AS n FROM ksi_pg_requests GROUP BY status")
    assert {r["status"]: r["n"] for r in final} == {"ok": 3000}
    arrivals = list(server.arrivals)
    assert len(arrivals) == 3000 and all(len(a) == 1 for a in by_request(arrivals).values())
    assert check_session_order(arrivals) == 300
    rows = check_ledger(postgres_dsn, arrivals)
    assert {r["outcome"] for r in rows} == {"ok"}
    assert sum(r["total_tokens"] for r in rows) == sum(a.usage["total_tokens"] for a in arrivals if a.usage)
    hosts = {r["host_id"] for r in rows}
    assert len(hosts) == 3, "every host ran requests"
    for r in results(tmp_path / "a.jsonl")[:50]:  # a host's results file has what any host stored
        assert r["text"] and r["usage"]["total_tokens"] > 0
    # the ksi-queue and ksi-tokens tables were never made: their plugins were not started
    assert not any(p.name.endswith(".db") and p.stat().st_size > 0 and "ksi_queue" in p.read_bytes().decode("latin-1")
                   for p in tmp_path.iterdir())


def test_a_killed_host_loses_only_its_calls_in_flight(tmp_path: Path, server: OpenAIServer, postgres_dsn: str) -> None:
    server.delay_s = 0.15
    lease_s = 2.0
    cfg = config(tmp_path / "ksi.toml", server.url, lease_s=lease_s, concurrency=8)
    environ = env(postgres_dsn)
    files = {name: requests(tmp_path / f"{name}-in.jsonl", 240, 48, name) for name in ("a", "b", "c")}
    procs = {name: start(tmp_path, name, tmp_path / f"{name}-in.jsonl", cfg, environ) for name in files}
    victim = procs["a"]
    deadline = time.monotonic() + 60
    while True:  # kill host a once the server holds calls it sent (its ledger rows still 'sent')
        try:
            sent = sql(postgres_dsn, "SELECT t.request_id FROM ksi_pg_token_usage t JOIN ksi_pg_hosts h USING (host_id)"
                                     " WHERE h.pid = $1 AND t.outcome = 'sent'", victim.pid)
        except asyncpg.UndefinedTableError:  # not migrated yet
            sent = []
        held = {prompt(a).split()[-1] for a in list(server.arrivals) if a.answered_at is None}
        if len({r["request_id"] for r in sent} & held) >= 3:  # received upstream, not answered yet
            break
        assert victim.poll() is None and time.monotonic() < deadline, "host a never had calls in flight"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait()
    for name in ("b", "c"):
        code, err = finish(procs[name])
        assert code == 0, f"host {name}: {err}"
    rerun = start(tmp_path, "a2", tmp_path / "a-in.jsonl", cfg, environ)  # host a's file again: answered from the store
    code, err = finish(rerun)
    assert code == 0, err
    assert sorted(r["request_id"] for r in results(tmp_path / "a2.jsonl")) == sorted(r["request_id"] for r in files["a"])
    final = sql(postgres_dsn, "SELECT status, count(*) AS n FROM ksi_pg_requests GROUP BY status")
    assert {r["status"]: r["n"] for r in final} == {"ok": 720}
    arrivals = list(server.arrivals)
    per = by_request(arrivals)
    twice = {rid for rid, a in per.items() if len(a) > 1}
    rows = check_ledger(postgres_dsn, arrivals)
    unknown = {r["request_id"] for r in rows if r["outcome"] == "unknown"}
    assert twice and twice <= unknown, "only the calls host a had in flight were sent again"
    assert len(unknown) <= 8 and all(len(per[rid]) == 2 for rid in twice)
    killed_host = {r["host_id"] for r in rows if r["outcome"] == "unknown"}
    assert len(killed_host) == 1  # all of host a's
    for rid in twice:  # sent again only after its lease ran out
        assert per[rid][1].t >= killed_at + lease_s * 0.6, f"{rid} was taken over before its lease ran out"
    assert check_session_order(arrivals) == 144


def test_two_hosts_given_the_same_request_ids(tmp_path: Path, server: OpenAIServer, postgres_dsn: str) -> None:
    cfg = config(tmp_path / "ksi.toml", server.url)
    environ = env(postgres_dsn)
    reqs = requests(tmp_path / "in.jsonl", 400, 40, "same")
    procs = [start(tmp_path, name, tmp_path / "in.jsonl", cfg, environ) for name in ("a", "b")]
    for p in procs:
        code, err = finish(p)
        assert code == 0, err
    arrivals = list(server.arrivals)
    assert len(arrivals) == 400 and sorted(by_request(arrivals)) == sorted(r["request_id"] for r in reqs)
    a, b = (sorted(results(tmp_path / f"{n}.jsonl"), key=lambda r: r["request_id"]) for n in ("a", "b"))
    assert a == b and len(a) == 400 and all(r["status"] == "ok" for r in a)
    assert check_session_order(arrivals) == 40
    check_ledger(postgres_dsn, arrivals)


def test_cancel_and_clear_session_from_a_fourth_process(tmp_path: Path, server: OpenAIServer, postgres_dsn: str) -> None:
    server.faults_by_model = {}
    server.delay_s = 30.0  # every call is held: the hosts are busy until cancelled
    cfg = config(tmp_path / "ksi.toml", server.url, concurrency=2)
    environ = env(postgres_dsn)
    reqs = requests(tmp_path / "in.jsonl", 12, 4, "c")  # 4 sessions of 3: 4 running (2 per host), 8 queued
    hosts = [start(tmp_path, name, tmp_path / "in.jsonl", cfg, environ) for name in ("a", "b")]  # the same ids
    try:
        deadline = time.monotonic() + 60
        while len(server.arrivals) < 4:  # one request of each session running, on the two hosts
            assert time.monotonic() < deadline, "the hosts did not start 4 requests"
            time.sleep(0.05)
        status = cli("status", tmp_path, cfg, environ, "--json")
        assert not (tmp_path / "cli.db").exists()  # read-only with Postgres serving: no local database made
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert [h["state"] for h in shown["hosts"]] == ["alive", "alive"]
        assert shown["queue"]["running"] == 4 and shown["queue"]["queued"] == 8
        running = [prompt(a).split()[-1] for a in server.arrivals]
        server.delay_s = 0.0  # the calls held stay held; what starts from now on is answered at once
        cleared = cli("clear-session", tmp_path, cfg, environ, reqs[0]["session_id"])
        assert cleared.returncode == 0 and "cancelled 2 queued" in cleared.stdout, cleared.stderr
        queued_one = next(r["request_id"] for r in reqs if r["request_id"] not in running
                          and r["session_id"] != reqs[0]["session_id"])
        assert cli("cancel", tmp_path, cfg, environ, queued_one).returncode == 0
        for rid in running:  # running on one host or the other: the cancel reaches it
            done = cli("cancel", tmp_path, cfg, environ, rid)
            assert done.returncode == 0 and "cancelled" in done.stdout, done.stderr
        codes = [finish(p) for p in hosts]
    finally:
        for p in hosts:
            if p.poll() is None:
                p.kill()
    assert [c for c, _ in codes] == [1, 1], codes  # some requests of the batch were cancelled: exit 1
    out = {r["request_id"]: r["status"] for r in results(tmp_path / "a.jsonl")}
    assert out == {r["request_id"]: r["status"] for r in results(tmp_path / "b.jsonl")}
    never = {reqs[4]["request_id"], reqs[8]["request_id"], queued_one}  # cleared with session 0, and one cancelled
    assert {rid for rid, s in out.items() if s == "cancelled"} == set(running) | never
    assert all(s == "ok" for rid, s in out.items() if rid not in set(running) | never) and len(out) == 12
    arrived = {prompt(a).split()[-1] for a in server.arrivals}
    assert not never & arrived, "a cancelled queued request reached the upstream"
    ledger = sql(postgres_dsn, "SELECT request_id, outcome FROM ksi_pg_token_usage WHERE outcome <> 'ok'")
    assert sorted(r["request_id"] for r in ledger) == sorted(running)  # the calls cut short: unknown
