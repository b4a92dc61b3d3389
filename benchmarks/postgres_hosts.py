"""postgres_hosts: aggregate durable completions/s of 1, 2 and 4 host processes sharing one PostgreSQL queue.

Each host is its own process: a Host with ksi-postgres (queue and ledger), ksi-retry and an in-process
provider that answers at once (``host_only``'s ``InstantPlugin``), submitting its share of the requests
the way ``ksi-host run`` does (``ksi_host.cli.runner.submit_all``, at most 2,000 unfinished) over its
own sessions, at concurrency 64 (``--concurrency``). Every host claims from the shared queue, so each also
runs the others' requests. PostgreSQL runs on the same machine in a throw-away cluster with its default
durability (``fsync`` and ``synchronous_commit`` on: every result and ledger row is on disk when its
transaction commits). The hosts start together (a common start time); the rate is all requests over the
time from that start to the last host's end. Beside it, from the same run, the SQLite queue: one process
with ksi-queue, ksi-tokens, ksi-retry and the same provider, the same number of requests.

Afterwards every request is checked: one ``ok`` row per request and one ledger row per call.
Target: >= 2,000 completions/s aggregate with 2 hosts.

    python benchmarks/postgres_hosts.py [--n 12000] [--sessions 600] [--rounds 2] [--hosts 1,2,4]
    python benchmarks/postgres_hosts.py --drivers      # asyncpg against psycopg 3 on the hot statements
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_RPS = 2000
HERE = Path(__file__).resolve().parent


# -- one host process ---------------------------------------------------------------------------------


async def worker(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from host_only import InstantPlugin, _mark_hookimpls
    from ksi_retry.plugin import Plugin as Retry

    import ksi_host
    from ksi_host.cli.runner import submit_all
    from ksi_host.commands import tune_gc

    _mark_hookimpls()
    if spec["kind"] == "postgres":
        from ksi_postgres.plugin import Plugin as Postgres

        os.environ["KSI_BENCH_DSN"] = spec["dsn"]
        plugins: list[Any] = [Postgres(), Retry(), InstantPlugin()]
        config = {"postgres": {"dsn_env": "KSI_BENCH_DSN", "concurrency": spec["concurrency"], "lease_s": 30.0,
                               "poll_s": 1.0}}
    else:
        from ksi_queue.plugin import Plugin as Queue
        from ksi_tokens.plugin import Plugin as Tokens

        plugins = [Queue(), Tokens(), Retry(), InstantPlugin()]
        config = {"queue": {"concurrency": spec["concurrency"]}}
    tag, n, sessions = spec["tag"], spec["n"], spec["sessions"]
    batch = [{"model": "bench-model", "prompt": f"{tag} question {i}", "session_id": f"{tag}-s{i % sessions}",
              "request_id": f"{tag}-{i}", "agent_id": "bench"} for i in range(n)]
    results: list[Any] = [None] * n

    def refused(i: int, request: Any, error: Exception) -> None:
        raise AssertionError(f"request {i} refused: {error}")

    async with ksi_host.Host(config, spec["db"], plugins=plugins) as host:
        warm = [{"model": "bench-model", "prompt": f"warm {i}", "session_id": f"{tag}-w{i % 8}"} for i in range(200)]
        await submit_all(host, enumerate(warm), window=2000, on_result=lambda i, r: None, on_refused=refused)
        tune_gc()
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        t0, c0 = time.time(), time.process_time()
        await submit_all(host, enumerate(batch), window=2000, on_result=results.__setitem__, on_refused=refused)
        t1, cpu = time.time(), time.process_time() - c0
        ran = host.hooks.impls("ksi_enqueue")[0]
        plugin = next(p.obj for p in host.plugins if p.name == ran.plugin) if host.plugins else None
        claimed = getattr(getattr(plugin, "queue", None), "claimed", None)
    return {"start": t0, "end": t1, "n": n, "ok": sum(1 for r in results if r is not None and r.ok), "cpu_s": cpu,
            "claimed": claimed}


# -- the benchmark -----------------------------------------------------------------------------------


def run_hosts(kind: str, hosts: int, n: int, sessions: int, concurrency: int, dsn: str | None, tmp: Path) -> dict[str, Any]:
    start_at = time.time() + 4.0 + hosts  # every process imports, starts its host and warms up before this
    procs = []
    for h in range(hosts):
        spec = {"kind": kind, "tag": f"{kind[:2]}{hosts}h{h}-{time.time_ns() % 10**9}", "n": n // hosts,
                "sessions": max(1, sessions // hosts), "concurrency": concurrency, "dsn": dsn,
                "db": str(tmp / f"{kind}-{hosts}-{h}-{time.time_ns()}.db"), "start_at": start_at}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"a host process failed ({p.returncode}):\n{err}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(o["n"] for o in outs)
    ok = sum(o["ok"] for o in outs)
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    late = max(o["start"] for o in outs) - min(o["start"] for o in outs)
    return {"kind": kind, "hosts": hosts, "n": total, "ok": ok, "wall_s": wall, "rps": total / wall,
            "cpu_us": sum(o["cpu_s"] for o in outs) / total * 1e6, "start_spread_s": late,
            "claimed": [o["claimed"] for o in outs]}


def check_postgres(dsn: str) -> dict[str, int]:
    import asyncpg

    async def go() -> dict[str, int]:
        con = await asyncpg.connect(dsn)
        try:
            ok = await con.fetchval("SELECT count(*) FROM ksi_pg_requests WHERE status = 'ok'")
            rows = await con.fetchval("SELECT count(*) FROM ksi_pg_requests")
            calls = await con.fetchval("SELECT count(*) FROM ksi_pg_token_usage WHERE outcome = 'ok'")
            return {"ok": ok, "rows": rows, "ledger_ok": calls}
        finally:
            await con.close()
    return asyncio.run(go())


def main_hosts(args: argparse.Namespace) -> None:
    from ksi_host.testing.postgres import PostgresCluster

    counts = [int(h) for h in args.hosts.split(",")]
    table: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp_s, PostgresCluster(settings={"max_connections": "300"}) as cluster:
        tmp = Path(tmp_s)
        print(f"PostgreSQL cluster (fsync on, synchronous_commit on) at {cluster.socket_dir}; {args.n} requests per "
              f"measurement, {args.sessions} sessions, concurrency {args.concurrency} per host", flush=True)
        for rnd in range(args.rounds):
            order = ["sqlite", *counts] if rnd % 2 == 0 else [*reversed(counts), "sqlite"]
            for what in order:
                if what == "sqlite":
                    r = run_hosts("sqlite", 1, args.n, args.sessions, args.concurrency, None, tmp)
                    key = "sqlite (1 process)"
                else:
                    dsn = cluster.create_database()
                    r = run_hosts("postgres", int(what), args.n, args.sessions, args.concurrency, dsn, tmp)
                    found = check_postgres(dsn)
                    expected = args.n // int(what) * int(what) + 200 * int(what)
                    assert found["ok"] == found["rows"] == expected and found["ledger_ok"] == expected, found
                    key = f"postgres, {what} host(s)"
                assert r["ok"] == r["n"], r
                table.setdefault(key, []).append(r)
                print(f"round {rnd + 1}: {key:22s} {r['rps']:8,.0f} completions/s  wall {r['wall_s']:.2f} s  "
                      f"CPU {r['cpu_us']:.0f} us/request (host processes)  claimed per host {r['claimed']}", flush=True)
    print("\n| setup | completions/s (median) | rounds | CPU us/request in the hosts |")
    print("| --- | --- | --- | --- |")
    for key, rs in table.items():
        print(f"| {key} | {statistics.median(r['rps'] for r in rs):,.0f} | "
              f"{', '.join(format(r['rps'], ',.0f') for r in rs)} | {statistics.median(r['cpu_us'] for r in rs):.0f} |")
    two = table.get("postgres, 2 host(s)")
    if two:
        rps = statistics.median(r["rps"] for r in two)
        print(f"\n2 hosts: {rps:,.0f} completions/s, target >= {TARGET_RPS:,}: {'PASS' if rps >= TARGET_RPS else 'MISS'}")


# -- asyncpg against psycopg 3 --------------------------------------------------------------------------


def main_drivers(args: argparse.Namespace) -> None:
    """The hot statements of ksi-postgres through each driver, batch sizes 1, 16 and 64: microseconds per row."""
    import re
    import uuid

    from ksi_host.testing.postgres import PostgresCluster

    sys.path.insert(0, str(HERE.parent / "plugins" / "postgres"))
    from ksi_postgres import schema
    from ksi_postgres.db import columns

    def named(sql: str) -> str:
        return re.sub(r"\$(\d+)", r"%(p\1)s", sql)

    def accept_args(n: int, tag: str, me: str) -> list[Any]:
        rows, pays = [], []
        for i in range(n):
            rows.append((f"{tag}-{i}", f"s{i % 100}", "a", None, None, "m", "normal", 2, None, "h"))
            pays.append([json.dumps([{"role": "user", "content": f"q {i}"}]), "{}", None, False]
                        + [None] * len(schema.PARAMETER_TYPES))
        return [*columns(rows, len(schema.ACCEPT_TYPES)), *columns(pays, len(schema.PAYLOAD_COLUMNS)), me,
                [r[0] for r in rows]]

    def store_args(me: str, taken: list[tuple[int, int, str]]) -> list[Any]:
        rows = [(seq, epoch, "ok", 1.0, 2.0, "ok", json.dumps({"role": "assistant", "content": "ok"}), "stop", "m", "p",
                 None, 10, 5, 15, 0.0001, None, None, None, None) for seq, epoch, _ in taken]
        att = [(seq, 1, "p", None, None, None, 1.0, None) for seq, _, _ in taken]
        return [me, *columns(rows, len(schema.STORE_TYPES)), *columns(att, len(schema.ATTEMPT_TYPES)),
                sorted({sid for *_, sid in taken})]

    async def bench(fetch: Any, n: int, b: int) -> dict[str, float]:
        me, tag = uuid.uuid4().hex, uuid.uuid4().hex[:6]
        t = dict.fromkeys(("accept", "claim", "store", "sent", "end"), 0.0)
        stored = 0
        for k in range(0, n, b):
            t0 = time.perf_counter()
            await fetch(schema.ACCEPT_CALL, accept_args(b, f"{tag}-{k}", me))
            t["accept"] += time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            found = await fetch(schema.CLAIM, [me, b, [], 30.0])
            t["claim"] += time.perf_counter() - t0
            if not found:
                break
            t0 = time.perf_counter()
            await fetch(schema.STORE_CALL, store_args(me, [(r[0], r[1], r[6]) for r in found]))  # 6: session_id
            stored += len(found)
            t["store"] += time.perf_counter() - t0
        assert stored == n, f"claimed and stored {stored} of {n}"
        for k in range(0, n, b):
            sent = [(uuid.uuid4().hex, f"r{k}-{i}", 1, "s", "a", None, None, "m", "p", time.time()) for i in range(b)]
            t0 = time.perf_counter()
            await fetch(schema.INSERT_SENT, [me, *columns(sent, len(schema.SENT_TYPES))])
            t["sent"] += time.perf_counter() - t0
            ends = [(*r, 10, 5, 15, 0.0001, 3.0, "ok") for r in sent]
            t0 = time.perf_counter()
            await fetch(schema.RECORD_END, [me, *columns(ends, len(schema.END_TYPES))])
            t["end"] += time.perf_counter() - t0
        return {k: v / n * 1e6 for k, v in t.items()}

    async def with_asyncpg(dsn: str, n: int, b: int) -> dict[str, float]:
        import asyncpg

        con = await asyncpg.connect(dsn)
        try:
            return await bench(lambda sql, a: con.fetch(sql, *a), n, b)
        finally:
            await con.close()

    async def with_psycopg(dsn: str, n: int, b: int) -> dict[str, float]:
        import psycopg

        con = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)

        async def fetch(sql: str, a: list[Any]) -> list[Any]:
            cur = await con.execute(named(sql), {f"p{i + 1}": v for i, v in enumerate(a)})
            return await cur.fetchall() if cur.description else []
        try:
            return await bench(fetch, n, b)
        finally:
            await con.close()

    async def go(dsn: str) -> None:
        import asyncpg

        con = await asyncpg.connect(dsn)
        async with con.transaction():
            await con.execute(schema.MIGRATIONS[0])
        await con.close()
        print("| batch | driver | accept | claim | store result | ledger sent | ledger end | total |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for b in (1, 16, 64):
            n = 400 if b == 1 else 2048
            runs: dict[str, list[dict[str, float]]] = {"asyncpg": [], "psycopg": []}
            for _ in range(args.rounds + 1):  # interleaved
                runs["asyncpg"].append(await with_asyncpg(dsn, n, b))
                runs["psycopg"].append(await with_psycopg(dsn, n, b))
            for name, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                print(f"| {b} | {name} | " + " | ".join(f"{v:.0f}" for v in med.values()) + f" | {sum(med.values()):.0f} |")

    with PostgresCluster() as cluster:
        print("microseconds per row (median of rounds; durable cluster, one connection, client and server together)")
        asyncio.run(go(cluster.create_database()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=12000, help="requests per measurement (split over the hosts)")
    parser.add_argument("--sessions", type=int, default=600, help="sessions per measurement (split over the hosts)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests running at most per host")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hosts", default="1,2,4", help="host process counts to measure")
    parser.add_argument("--drivers", action="store_true", help="compare asyncpg and psycopg 3 on the hot statements")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(json.loads(args.worker)))))
    elif args.drivers:
        main_drivers(args)
    else:
        main_hosts(args)


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    main()
