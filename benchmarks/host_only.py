"""host_only: what the host itself costs, with a provider that answers at once.

The provider is an in-process plugin defined here (``InstantPlugin``: no
network, answers with usage so every request writes a ledger row). Every other
plugin is the real one: ksi-queue (durable queue), ksi-retry, ksi-tokens
(ledger), on a database file. N requests (given as dicts, as ``ksi-host run``
reads them) across S sessions are submitted at once; the queue runs them at
concurrency 16. The process (its database thread included) is pinned to one CPU.

Reported per round: wall time, completions per second, CPU microseconds per
request (``time.process_time``, every thread of the process), commits, and a
check that every request, result and ledger row is in the database afterwards.
Each round is a fresh process and a fresh database, after an uncounted
warm-up. Target: >= 5,000 completions/s on one core.

    python benchmarks/host_only.py [--n 20000] [--sessions 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

TARGET_RPS = 5000


class InstantProvider:
    """A provider that answers at once (satisfies ksi_host.models.Provider)."""

    name = "instant"
    timeout_s = None

    def __init__(self) -> None:
        from ksi_host.models import ProviderResponse, Usage

        self._response = ProviderResponse
        self._usage = Usage(12, 3, 15, 0.00001)

    async def complete(self, request: Any, *, timeout_s: float | None) -> Any:
        return self._response("ok", usage=self._usage, model=request.model, session_id=request.session_id)


class InstantPlugin:
    """The benchmark's provider plugin: one deployment serving every model."""

    def __init__(self) -> None:
        self.provider = InstantProvider()

    def ksi_select_provider(self, host: Any, request: Any, exclude: frozenset[str]) -> Any:
        return None if self.provider.name in exclude else self.provider

    def ksi_list_providers(self, host: Any, model: str | None) -> list[Any]:
        from ksi_host.models import ProviderInfo

        return [ProviderInfo(self.provider.name, "*", "bench")]


def _mark_hookimpls() -> None:
    import ksi_host

    for name in ("ksi_select_provider", "ksi_list_providers"):
        setattr(InstantPlugin, name, ksi_host.hookimpl(getattr(InstantPlugin, name)))


async def submit_all(host: Any, batch: list[dict[str, Any]], mode: str, window: int) -> list[Any]:
    """Submit every request of ``batch`` and wait for every result.

    ``agents``: one agent per session, each awaiting its requests one after the other
    (``await host.complete(r)`` in a loop), all agents at once. ``batch``: as ``ksi-host run``
    does (``ksi_host.cli.runner.submit_all``): in order, at most ``window`` unfinished, results
    through callbacks."""
    if mode == "agents":
        by_session: dict[Any, list[dict[str, Any]]] = {}
        for r in batch:
            by_session.setdefault(r["session_id"], []).append(r)

        async def agent(share: list[dict[str, Any]]) -> list[Any]:
            return [await host.complete(r) for r in share]

        return [r for share in await asyncio.gather(*map(agent, by_session.values())) for r in share]
    from ksi_host.cli.runner import submit_all as submit_windowed

    results: list[Any] = [None] * len(batch)

    def refused(i: int, request: Any, error: Exception) -> None:
        raise AssertionError(f"request {i} refused: {error}")

    await submit_windowed(host, enumerate(batch), window=window, on_result=results.__setitem__, on_refused=refused)
    return results


async def run_one(n: int, sessions: int, concurrency: int, warmup: int, mode: str, window: int,
                  profile: str | None, gc_setting: str = "default") -> dict[str, Any]:
    from ksi_queue.plugin import Plugin as Queue
    from ksi_retry.plugin import Plugin as Retry
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host

    _mark_hookimpls()

    def requests(tag: str, count: int) -> list[dict[str, Any]]:
        return [{"model": "bench-model", "prompt": f"{tag} question {i}", "session_id": f"s{i % sessions}",
                 "agent_id": "bench"} for i in range(count)]  # request ids: the host's own (random uuid4 hex)

    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "host_only.db"
        config = {"queue": {"concurrency": concurrency}}
        async with ksi_host.Host(config, db_path, plugins=[Queue(), Retry(), Tokens(), InstantPlugin()]) as host:
            await submit_all(host, requests("warm", warmup), mode, window)
            if gc_setting == "cli":
                from ksi_host.commands import tune_gc

                tune_gc()  # what ksi-host run does once its host has started
            batch = requests("run", n)
            commits0 = host.db.commits
            profiler = None
            if profile:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="disabled")
                profiler.start()
            c0, m0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            results = await submit_all(host, batch, mode, window)
            wall, cpu, main_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
            if profiler is not None:
                profiler.stop()
                Path(profile).write_text(profiler.output_text(unicode=True, show_all=False))
            commits = host.db.commits - commits0
        ok = sum(r.ok for r in results)
        con = sqlite3.connect(db_path)  # after the host stopped: what a fresh process would find
        con.execute("CREATE TEMP TABLE run_ids (request_id TEXT PRIMARY KEY)")
        con.executemany("INSERT INTO run_ids VALUES (?)", [(r.request_id,) for r in results])
        stored_ok = con.execute("SELECT COUNT(*) FROM ksi_queue_requests JOIN run_ids USING (request_id) WHERE status = 'ok'"
                                ).fetchone()[0]
        ledger = con.execute("SELECT COUNT(*) FROM token_usage JOIN run_ids USING (request_id)").fetchone()[0]
        con.close()
    return {"n": n, "ok": ok, "wall_s": wall, "cpu_s": cpu, "rps": n / wall, "cpu_us": cpu / n * 1e6,
            "loop_us": main_cpu / n * 1e6, "sqlite_us": (cpu - main_cpu) / n * 1e6,
            "commits": commits, "stored_ok": stored_ok, "ledger_rows": ledger}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="requests per round (default 20000)")
    ap.add_argument("--sessions", type=int, default=100, help="sessions (agents) the requests are spread over (default 100)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--modes", default="agents,batch", help="submission patterns to run (default agents,batch)")
    ap.add_argument("--window", type=int, default=2000, help="batch mode: requests in flight at most (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each mode, interleaved; fresh process and database each")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    ap.add_argument("--profile", metavar="FILE", help="write a pyinstrument profile of the first round to FILE")
    ap.add_argument("--gc", default="cli",
                    help="GC settings, comma-separated to compare them interleaved: cli (gc.freeze() and a first "
                         "threshold of 50,000 after start-up, as ksi-host run sets them) or default (Python's); "
                         "default cli")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one round of this mode, JSON out
    args = ap.parse_args()
    if args.one:
        cpu = None if args.no_pin else common.pin_to_one_core()
        reference = common.reference_ms()
        out = asyncio.run(run_one(args.n, args.sessions, args.concurrency, args.warmup, args.one, args.window, args.profile,
                                  args.gc))
        out["cpu"] = cpu
        out["reference_ms"] = (reference + common.reference_ms()) / 2  # the machine's speed around the round
        print(json.dumps(out))
        return 0

    env = {**os.environ, "KSI_HOST_PLUGINS": "queue,retry,tokens"}
    gcs = args.gc.split(",")
    if not set(gcs) <= {"cli", "default"}:
        ap.error("--gc: cli, default or both")
    modes = [(m, g) for m in args.modes.split(",") for g in gcs]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {m: [] for m in modes}
    for i in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every mode alike
        for mode, gc_setting in modes:
            child = [__file__, "--one", mode, "--n", str(args.n), "--sessions", str(args.sessions), "--concurrency",
                     str(args.concurrency), "--warmup", str(args.warmup), "--window", str(args.window),
                     "--gc", gc_setting]
            if args.no_pin:
                child.append("--no-pin")
            if args.profile and i == 0:
                child += ["--profile", f"{args.profile}.{mode}"]
            runs[mode, gc_setting].append(common.run_json(child, env))
    pinned = runs[modes[0]][0]["cpu"]
    print(f"host_only: {args.n:,} requests per round over {args.sessions} sessions, queue concurrency {args.concurrency}; "
          f"instant in-process provider; real queue, retry and tokens plugins on a database file; "
          f"{'pinned to CPU ' + str(pinned) if pinned is not None else 'not pinned'}; {args.rounds} round(s) per mode; "
          f"load average {common.load_average()}")
    print("  agents: one agent per session awaits its requests one after the other, all agents at once")
    print(f"  batch:  ksi_host.cli.runner.submit_all, at most {args.window:,} unfinished (what ksi-host run does)")
    print("  gc cli: gc.freeze() and a first GC threshold of 50,000 once the host started, as ksi-host run sets them "
          "(ksi_host.commands.tune_gc); gc default: Python's settings")
    rows = []
    verdicts = []
    for (mode, gc_setting), rs in runs.items():
        mode = f"{mode} (gc {gc_setting})"
        rps = common.median([r["rps"] for r in rs])
        durable = all(r["stored_ok"] == r["n"] and r["ledger_rows"] == r["n"] for r in rs)
        rows.append([mode, f"{sum(r['ok'] for r in rs):,}/{sum(r['n'] for r in rs):,}", rps, min(r["rps"] for r in rs), max(r["rps"] for r in rs),
                     common.median([r["cpu_us"] for r in rs]), common.median([r["loop_us"] for r in rs]),
                     common.median([r["sqlite_us"] for r in rs]), common.median([r["n"] / r["cpu_s"] for r in rs]),
                     common.median([r["n"] / r["commits"] for r in rs]), common.median([r["reference_ms"] for r in rs]),
                     "yes" if durable else "NO"])
        verdicts.append((mode, rps, durable))
    print(common.table(["mode", "ok", "completions/s", "min", "max", "CPU us/req", "loop", "db thread",
                        "per CPU-second", "req/commit", "ref ms", "all durable"], rows))
    print("(medians over rounds; CPU us/req = time.process_time of every thread per request: the event loop's share "
          "(which commits every write) and the database thread's (queries, checkpoints); per CPU-second = requests / CPU seconds; ref ms = CPU time of a fixed Python loop "
          f"around each round, the machine's speed then: {common.reference_ms():.1f} ms now, lower is faster)")
    for mode, rps, durable in verdicts:
        print(f"target >= {TARGET_RPS:,} completions/s on one core, every request, result and ledger row durable "
              f"({mode}): {common.verdict(rps >= TARGET_RPS and durable)} ({rps:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
