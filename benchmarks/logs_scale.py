"""logs_scale: ``ksi-host logs`` and ``ksi-host show`` on a database of a million requests.

Fills a database (the real ksi-queue and ksi-tokens tables, made by their migrations) with N requests over S
sessions, A agents and M models, spread over 30 days: their payloads, attempts and ledger rows, most ``ok``,
every 50th ``error`` (after a failed first attempt), every 200th ``cancelled``, the newest 1,000 still
``queued``. The rows are written with SQL directly (``INSERT ... SELECT`` from a counter, 100,000 rows per
transaction), not through the host: filling takes a minute, not an hour. Then a host that does not serve (as
``ksi-host logs`` opens it) answers ``host.list_requests`` with each filter of ``RequestQuery`` alone and with
two together, and ``host.request_details`` (the queue's request, state and result, the ledger's calls) for
requests old and new, each ``--repeat`` times; the table prints the median and the worst in ms.
Target: each under 50 ms.

    python benchmarks/logs_scale.py [--requests 1000000] [--sessions 10000] [--db PATH --keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import common

TARGET_MS = 50.0
BATCH = 100_000
DAYS = 30
QUEUED = 1_000  # the newest requests, still queued

_COUNTER = "WITH RECURSIVE n(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :end)"
# Columns computed from the counter i (:start to :end): :first the first created_at, :step seconds between
# requests, :sessions, :agents, :models, :n the number of requests (the newest QUEUED ones are queued).
_STATUS = (f"CASE WHEN i >= :n - {QUEUED} THEN 'queued' WHEN i % 200 = 3 THEN 'cancelled' WHEN i % 50 = 7 THEN 'error'"
           " ELSE 'ok' END")
_FILL_REQUESTS = f"""
{_COUNTER}
INSERT INTO ksi_queue_requests (seq, request_id, session_id, agent_id, purpose, model, priority, max_tokens, status,
    created_at, started_at, finished_at, result_text, result_model, result_provider, prompt_tokens, completion_tokens,
    total_tokens, cost_usd, error_type, error_message, finish_reason, result_message_json, continue_session)
SELECT i + 1, printf('req-%09d', i), printf('s%05d', i % :sessions), printf('agent-%03d', i % :agents), 'bench',
    printf('model-%d', i % :models), 'normal', 256, status, created, CASE WHEN status = 'queued' THEN NULL ELSE created + 0.2 END,
    CASE WHEN status = 'queued' THEN NULL ELSE created + 1.5 END,
    CASE WHEN status = 'ok' THEN printf('answer %d', i) END, CASE WHEN status = 'ok' THEN printf('model-%d', i % :models) END,
    CASE WHEN status IN ('ok', 'error') THEN 'deployment-a' END,
    CASE WHEN status = 'queued' THEN NULL WHEN status = 'ok' THEN 120 ELSE 0 END,
    CASE WHEN status = 'queued' THEN NULL WHEN status = 'ok' THEN 40 ELSE 0 END,
    CASE WHEN status = 'queued' THEN NULL WHEN status = 'ok' THEN 160 ELSE 0 END,
    CASE WHEN status = 'ok' THEN 0.0002 END,
    CASE status WHEN 'error' THEN 'ProviderUnavailable' WHEN 'cancelled' THEN 'Cancelled' END,
    CASE status WHEN 'error' THEN '503 from upstream' WHEN 'cancelled' THEN 'cancelled before it ran' END,
    CASE WHEN status = 'ok' THEN 'stop' END, CASE WHEN status = 'ok' THEN '{{"role":"assistant"}}' END, 0
FROM (SELECT i, :first + i * :step AS created, {_STATUS} AS status FROM n)
"""
_FILL_PAYLOADS = f"""
{_COUNTER}
INSERT INTO ksi_queue_payloads (seq, messages_json, metadata_json)
SELECT i + 1, printf('[{{"role":"user","content":"question %d"}}]', i), '{{}}' FROM n
"""
_FILL_ATTEMPTS = f"""
{_COUNTER}
INSERT INTO ksi_queue_attempts (request_id, number, provider, error_type, error_message, delay_s, latency_ms)
SELECT printf('req-%09d', i), a.number, 'deployment-a', CASE WHEN a.number = 1 AND status = 'error' THEN 'RateLimited'
    WHEN status = 'error' THEN 'ProviderUnavailable' END, NULL, NULL, 1200.0
FROM (SELECT i, {_STATUS} AS status FROM n) JOIN (SELECT 1 AS number UNION ALL SELECT 2) a
    ON status = 'ok' AND a.number = 1 OR status = 'error'
"""
_FILL_LEDGER = f"""
{_COUNTER}
INSERT INTO token_usage (call_id, request_id, attempt, session_id, agent_id, purpose, model, provider, prompt_tokens,
    completion_tokens, total_tokens, cost_usd, latency_ms, outcome, created_at)
SELECT printf('call-%09d-%d', i, a.number), printf('req-%09d', i), a.number, printf('s%05d', i % :sessions),
    printf('agent-%03d', i % :agents), 'bench', printf('model-%d', i % :models), 'deployment-a',
    CASE WHEN status = 'ok' THEN 120 END, CASE WHEN status = 'ok' THEN 40 END, CASE WHEN status = 'ok' THEN 160 END,
    CASE WHEN status = 'ok' THEN 0.0002 END, 1200.0,
    CASE WHEN status = 'ok' THEN 'ok' WHEN a.number = 1 THEN 'RateLimited' ELSE 'ProviderUnavailable' END,
    :first + i * :step + 0.2
FROM (SELECT i, {_STATUS} AS status FROM n) JOIN (SELECT 1 AS number UNION ALL SELECT 2) a
    ON status = 'ok' AND a.number = 1 OR status = 'error'
"""


async def create(db: Path) -> None:
    """The tables, as the queue's and the ledger's migrations make them."""
    from ksi_queue.plugin import Plugin as Queue
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host

    async with ksi_host.Host({}, db, plugins=[Queue(), Tokens()]):
        pass


def fill(db: Path, n: int, sessions: int, agents: int, models: int) -> float:
    """Write ``n`` requests with SQL, ``BATCH`` per transaction; the seconds it took."""
    t0 = time.perf_counter()
    first, step = time.time() - DAYS * 86400, DAYS * 86400 / n
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = OFF")  # (a benchmark's own database: rebuilt if the machine stops)
    for start in range(0, n, BATCH):
        end = min(n, start + BATCH)
        params = {"start": start, "end": end, "first": first, "step": step, "sessions": sessions, "agents": agents,
                  "models": models, "n": n}
        con.execute("BEGIN")
        for sql in (_FILL_REQUESTS, _FILL_PAYLOADS, _FILL_ATTEMPTS, _FILL_LEDGER):
            con.execute(sql, params)
        con.execute("COMMIT")
        print(f"  {end:,} requests written ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return time.perf_counter() - t0


async def measure(db: Path, n: int, repeat: int) -> list[tuple[str, list[float], int]]:
    """(what, ms of each call, rows answered) for each query."""
    from ksi_queue.plugin import Plugin as Queue
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host
    from ksi_host.models import RequestQuery

    newest = time.time()
    hour_ago = newest - 3600  # the last hour: a few dozen requests of 30 days (with n = 1,000,000, ~1,400)
    queries = [
        ("newest 20", RequestQuery()),
        ("newest 200", RequestQuery(limit=200)),
        ("session_id", RequestQuery(session_id="s04242")),
        ("agent_id", RequestQuery(agent_id="agent-042")),
        ("model", RequestQuery(model="model-3")),
        ("status ok", RequestQuery(status="ok")),
        ("status error", RequestQuery(status="error")),
        ("status cancelled", RequestQuery(status="cancelled")),
        ("status queued", RequestQuery(status="queued")),
        ("status running (none)", RequestQuery(status="running")),
        ("since 1 h ago", RequestQuery(since=hour_ago)),
        ("since 29 days ago", RequestQuery(since=newest - 29 * 86400)),
        ("since 1 h ago + session", RequestQuery(since=hour_ago, session_id="s04242")),
        ("session + agent", RequestQuery(session_id="s04242", agent_id="agent-042")),
        ("agent + model", RequestQuery(agent_id="agent-042", model="model-2")),
        ("model + status error", RequestQuery(model="model-2", status="error")),
        ("agent + status cancelled", RequestQuery(agent_id="agent-003", status="cancelled")),
        # none such: every row of the index read is checked (here every failed row: 2.5 % of the requests)
        ("model + error (none such)", RequestQuery(model="model-3", status="error")),
        ("agent + cancelled (none such)", RequestQuery(agent_id="agent-042", status="cancelled")),
        ("session (none such)", RequestQuery(session_id="nobody")),
    ]
    out = []
    async with ksi_host.Host({}, db, plugins=[Queue(), Tokens()], serve=False) as host:
        for name, query in queries:
            times, found = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                found = len(await host.list_requests(query))
                times.append((time.perf_counter() - t0) * 1000)
            out.append((f"list: {name}", times, found))
        an_error = n // 2 // 200 * 200 + 7  # (i % 50 = 7, i % 200 = 7: an error, not a cancel)
        for name, rid in (("oldest", "req-000000000"), ("an error (2 calls)", f"req-{an_error:09d}"),
                          ("newest final", f"req-{n - QUEUED - 1:09d}"), ("queued", f"req-{n - 1:09d}"),
                          ("unknown", "req-none")):
            times, found = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                details = await host.request_details(rid)
                times.append((time.perf_counter() - t0) * 1000)
                found = len((details or {}).get("calls") or ()) if details else 0
            out.append((f"details: {name}", times, found))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5, help="calls of each query (median and worst reported)")
    ap.add_argument("--db", help="database file (default: a temporary one); an existing one is used as it is")
    ap.add_argument("--keep", action="store_true", help="keep the temporary database (its path is printed)")
    args = ap.parse_args()
    if args.requests <= 2 * QUEUED:
        ap.error(f"--requests: more than {2 * QUEUED:,}")
    tmp = None
    if args.db:
        db = Path(args.db)
    else:
        tmp = tempfile.mkdtemp(prefix="logs_scale-")
        db = Path(tmp) / "logs.db"
    filled = None
    if not db.exists():
        asyncio.run(create(db))
        filled = fill(db, args.requests, args.sessions, args.agents, args.models)
    size = os.path.getsize(db)
    results = asyncio.run(measure(db, args.requests, args.repeat))
    print(f"logs_scale: {args.requests:,} requests over {args.sessions:,} sessions, {args.agents} agents, {args.models} "
          f"models, {DAYS} days; {size / 1e6:,.0f} MB" + (f", filled in {filled:.0f} s" if filled else " (existing)")
          + f"; a reading host (serve=False); {args.repeat} calls each; load average {common.load_average()}")
    rows = [[name, len(times) and sorted(times)[len(times) // 2], max(times), found] for name, times, found in results]
    print(common.table(["query", "median ms", "worst ms", "rows (details: ledger calls)"], rows))
    worst = max(max(times) for _, times, _ in results)
    print(f"target: every list and details call under {TARGET_MS:g} ms: {common.verdict(worst < TARGET_MS)} "
          f"(worst {worst:.1f} ms)")
    if tmp is not None:
        if args.keep:
            print(f"database kept: {db}")
        else:
            for f in Path(tmp).iterdir():
                f.unlink()
            os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
