"""scale: 100,000 queued requests across 10,000 sessions: memory, and restore after a restart.

Two fresh processes share one database file:

1. ``fill``: a Host (ksi-queue, ksi-retry, ksi-tokens and a provider defined
   here that never answers) accepts N requests over S sessions; the queue starts
   16 of them, which wait forever. The host stops: every request stays stored
   unfinished (the 16 started ones too).
2. ``restore``: a new Host on that database, same plugins. Its start-up (the
   queue restores every unfinished request and starts the first 16, which again
   never finish) is timed from ``Host.start()`` until it returns; then
   ``host.status()`` must count all N as queued or running.

Peak RSS (``ru_maxrss``) is reported for both processes, with the RSS of the
same process before the Host started (Python and the imported modules).
Targets: peak RSS <= 200 MB while holding them queued; restore <= 2 s.

    python benchmarks/scale.py [--n 100000] [--sessions 10000]
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

TARGET_RSS_MB = 200
TARGET_RESTORE_S = 2.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class NeverProvider:
    """A provider whose calls wait until they are cancelled (the host stopping)."""

    name = "never"
    timeout_s = None

    async def complete(self, request: Any, *, timeout_s: float | None) -> Any:
        await asyncio.Event().wait()


class NeverPlugin:
    def __init__(self) -> None:
        self.provider = NeverProvider()

    def ksi_select_provider(self, host: Any, request: Any, exclude: frozenset[str]) -> Any:
        return self.provider

    def ksi_list_providers(self, host: Any, model: str | None) -> list[Any]:
        from ksi_host.models import ProviderInfo

        return [ProviderInfo(self.provider.name, "*", "bench")]


def plugins() -> list[Any]:
    from ksi_queue.plugin import Plugin as Queue
    from ksi_retry.plugin import Plugin as Retry
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host

    for name in ("ksi_select_provider", "ksi_list_providers"):
        setattr(NeverPlugin, name, ksi_host.hookimpl(getattr(NeverPlugin, name)))
    return [Queue(), Retry(), Tokens(), NeverPlugin()]


async def fill(db: str, n: int, sessions: int, chunk: int) -> dict[str, Any]:
    import ksi_host

    plugin_objects = plugins()
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    async with ksi_host.Host({}, db, plugins=plugin_objects) as host:
        for start in range(0, n, chunk):
            batch = [{"model": "bench-model", "session_id": f"s{i % sessions}", "agent_id": f"agent-{i % 97}",
                      "purpose": "scale", "prompt": f"request {i}: summarise the paragraph about item {i}"}
                     for i in range(start, min(n, start + chunk))]
            await asyncio.gather(*map(host.submit, batch))  # returns once each is stored; tickets dropped
        submitted_s = time.perf_counter() - t0
        status = (await host.status())["queue"]
        peak = common.peak_rss_mb()
    return {"rss_before_mb": rss0, "peak_rss_mb": peak, "submit_s": submitted_s,
            "queued": status["queued"], "running": status["running"], "sessions": status["sessions"]}


async def restore(db: str) -> dict[str, Any]:
    import ksi_host

    plugin_objects = plugins()
    rss0 = current_rss_mb()
    host = ksi_host.Host({}, db, plugins=plugin_objects)
    t0 = time.perf_counter()
    await host.start()
    restore_s = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        status = (await host.status())["queue"]
        status_s = time.perf_counter() - t1
        await asyncio.sleep(0.2)  # the first requests start running (their stored messages are loaded)
        peak = common.peak_rss_mb()
    finally:
        t2 = time.perf_counter()
        await host.stop()
        stop_s = time.perf_counter() - t2
    return {"rss_before_mb": rss0, "peak_rss_mb": peak, "restore_s": restore_s, "status_s": status_s, "stop_s": stop_s,
            "queued": status["queued"], "running": status["running"], "sessions": status["sessions"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="requests (default 100000)")
    ap.add_argument("--sessions", type=int, default=10_000, help="sessions (default 10000)")
    ap.add_argument("--chunk", type=int, default=5000, help="fill: requests submitted together (default 5000)")
    ap.add_argument("--restores", type=int, default=3, help="restore runs, each a fresh process (default 3)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: fill or restore, JSON out
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "fill":
        print(json.dumps(asyncio.run(fill(args.db, args.n, args.sessions, args.chunk))))
        return 0
    if args.phase == "restore":
        print(json.dumps(asyncio.run(restore(args.db))))
        return 0

    env = {**os.environ, "KSI_HOST_PLUGINS": "queue,retry,tokens"}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "scale.db")
        filled = common.run_json([__file__, "--phase", "fill", "--db", db, "--n", str(args.n), "--sessions",
                                  str(args.sessions), "--chunk", str(args.chunk)], env)
        restored = [common.run_json([__file__, "--phase", "restore", "--db", db], env) for _ in range(args.restores)]
        db_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    print(f"scale: {args.n:,} requests over {args.sessions:,} sessions; queue, retry, tokens and a provider that never "
          f"answers; database {db_mb:.0f} MB; load average {common.load_average()}")
    rows = [["fill", filled["rss_before_mb"], filled["peak_rss_mb"], f"submit {filled['submit_s']:.1f} s",
             filled["queued"] + filled["running"], filled["sessions"]]]
    for i, r in enumerate(restored, 1):
        rows.append([f"restore {i}", r["rss_before_mb"], r["peak_rss_mb"],
                     f"start {r['restore_s']:.2f} s (status {r['status_s']:.2f} s, stop {r['stop_s']:.2f} s)",
                     r["queued"] + r["running"], r["sessions"]])
    print(common.table(["process", "RSS before host MB", "peak RSS MB", "time", "queued+running", "sessions"], rows))
    all_back = all(r["queued"] + r["running"] == args.n for r in restored)
    restore_s = common.median([r["restore_s"] for r in restored])
    peak = max([filled["peak_rss_mb"]] + [r["peak_rss_mb"] for r in restored])
    print(f"every request restored: {'yes' if all_back else 'NO'}")
    print(f"target peak RSS <= {TARGET_RSS_MB} MB holding {args.n:,} queued (fill and restore): "
          f"{common.verdict(peak <= TARGET_RSS_MB)} ({peak:.0f} MB)")
    print(f"target restore <= {TARGET_RESTORE_S:g} s (median start-up of the restoring host): "
          f"{common.verdict(restore_s <= TARGET_RESTORE_S and all_back)} ({restore_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
