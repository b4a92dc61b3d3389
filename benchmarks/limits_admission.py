"""limits_admission: what ksi-limits costs per request, on host_only's setup.

host_only's way (``benchmarks/host_only.py``: an instant in-process provider,
the real queue, retry and tokens plugins on a database file, one CPU), in
four configurations, interleaved round by round (fresh process and database
each):

* ``none``: no limits plugin (host_only itself);
* ``no table``: ksi-limits loaded, with no ``[limits]`` table (installed, unused);
* ``one limit``: ksi-limits with one deployment rule (rpm and tpm, never
  reached: every request pays the estimate, the window's take and true-up);
* ``limit+budget``: that rule plus a daily budget per agent (the spend check
  and hold on top; the ledger is read once, the reading stays fresh).

Reported per configuration: completions/s and CPU microseconds per request
(medians), and the extra CPU per request against ``none``. Target: with one
limit, host_only stays >= 5,000 completions/s.

    python benchmarks/limits_admission.py [--n 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

TARGET_RPS = 5000

CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "no table": {},
    "one limit": {"rules": [{"scope": "deployment", "match": "instant", "rpm": 10**9, "tpm": 10**12}]},
    "limit+budget": {"rules": [{"scope": "deployment", "match": "instant", "rpm": 10**9, "tpm": 10**12}],
                     "budgets": [{"scope": "agent", "match": "*", "usd": 1e9}], "budget_refresh_s": 3600},
}
"""Each configuration's ``[limits]`` table (None: the plugin is not loaded)."""


async def run_one(name: str, n: int, sessions: int, concurrency: int, warmup: int) -> dict[str, Any]:
    import host_only
    from ksi_queue.plugin import Plugin as Queue
    from ksi_retry.plugin import Plugin as Retry
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host

    host_only._mark_hookimpls()
    limits = CONFIGS[name]
    plugins: list[Any] = [Queue(), Retry(), Tokens(), host_only.InstantPlugin()]
    config: dict[str, Any] = {"queue": {"concurrency": concurrency}}
    if limits is not None:
        from ksi_limits.plugin import Plugin as Limits

        plugins.append(Limits())
        config["limits"] = limits

    def requests(tag: str, count: int) -> list[dict[str, Any]]:
        return [{"model": "bench-model", "prompt": f"{tag} question {i}", "session_id": f"s{i % sessions}",
                 "agent_id": f"agent{i % sessions}"} for i in range(count)]

    with tempfile.TemporaryDirectory() as tmp:
        async with ksi_host.Host(config, Path(tmp) / "bench.db", plugins=plugins) as host:
            await host_only.submit_all(host, requests("warm", warmup), "agents", 0)
            from ksi_host.commands import tune_gc

            tune_gc()
            batch = requests("run", n)
            c0, t0 = time.process_time(), time.perf_counter()
            results = await host_only.submit_all(host, batch, "agents", 0)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"name": name, "n": n, "ok": sum(r.ok for r in results), "rps": n / wall, "cpu_us": cpu / n * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="requests per round (default 20000)")
    ap.add_argument("--sessions", type=int, default=100, help="sessions (one agent each; default 100)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration, interleaved (default 3)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one round of this configuration, JSON out
    args = ap.parse_args()
    if args.one:
        cpu = None if args.no_pin else common.pin_to_one_core()
        out = asyncio.run(run_one(args.one, args.n, args.sessions, args.concurrency, args.warmup))
        out["cpu"] = cpu
        print(json.dumps(out))
        return 0

    env = {**os.environ, "KSI_HOST_PLUGINS": "queue,retry,tokens"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            child = [__file__, "--one", name, "--n", str(args.n), "--sessions", str(args.sessions),
                     "--concurrency", str(args.concurrency), "--warmup", str(args.warmup)]
            if args.no_pin:
                child.append("--no-pin")
            runs[name].append(common.run_json(child, env))
    pinned = runs["none"][0]["cpu"]
    print(f"limits_admission: {args.n:,} requests per round over {args.sessions} sessions/agents, queue concurrency "
          f"{args.concurrency}; host_only's setup (instant provider, real queue, retry, tokens); "
          f"{'pinned to CPU ' + str(pinned) if pinned is not None else 'not pinned'}; {args.rounds} round(s) each, "
          f"interleaved; load average {common.load_average()}")
    base = common.median([r["cpu_us"] for r in runs["none"]])
    rows = []
    for name, rs in runs.items():
        cpu = common.median([r["cpu_us"] for r in rs])
        rows.append([name, f"{sum(r['ok'] for r in rs):,}/{sum(r['n'] for r in rs):,}",
                     common.median([r["rps"] for r in rs]), min(r["rps"] for r in rs), cpu, cpu - base])
    print(common.table(["config", "ok", "completions/s", "min", "CPU us/req", "+us vs none"], rows))
    one = common.median([r["rps"] for r in runs["one limit"]])
    print(f"target >= {TARGET_RPS:,} completions/s with one limit: {common.verdict(one >= TARGET_RPS)} ({one:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
