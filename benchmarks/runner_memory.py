"""runner_memory: peak memory of ``ksi-host run``'s batch runner against the size of its input.

For each N, a fresh process writes a file of N tiny request lines, then runs it the way
``ksi-host run`` does (``open_requests``, ``count_lines``, ``iter_lines``, ``BatchRunner``, the
CLI's GC settings) through the real queue, retry and tokens plugins on a database file, with the
instant in-process provider of ``host_only.py``; results go to a file. It prints the process's
peak resident set size (the input file is written before the run, by the same process: its own
memory is small), the time and the rate. The runner streams its input, so the peak should stay
flat as N grows: bounded by the window (2,000 unfinished requests) and a compact set of request
id hashes (about 115 bytes a line). Target: <= 250 MB peak RSS for 1,000,000 lines.

    python benchmarks/runner_memory.py [--n 1000,100000,1000000]
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

TARGET_MB = 250
TARGET_LINES = 1_000_000


async def run_file(path: Path, out_path: Path, db_path: Path) -> Any:
    from host_only import InstantPlugin, _mark_hookimpls
    from ksi_queue.plugin import Plugin as Queue
    from ksi_retry.plugin import Plugin as Retry
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host
    from ksi_host.cli.runner import BatchRunner, count_lines, iter_lines, open_requests
    from ksi_host.commands import tune_gc

    _mark_hookimpls()
    total = count_lines(str(path))
    async with ksi_host.Host({}, db_path, plugins=[Queue(), Retry(), Tokens(), InstantPlugin()]) as host:
        tune_gc()
        with open_requests(str(path)) as requests, open(out_path, "w", encoding="utf-8") as out, \
                open(os.devnull, "w") as progress:
            return await BatchRunner(host, out, progress, total=total).run(iter_lines(requests))


def one(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(f'{{"model": "m", "prompt": "q{i}"}}\n')
        size_mb = path.stat().st_size / 1e6
        before = common.peak_rss_mb()
        t0 = time.perf_counter()
        stats = asyncio.run(run_file(path, Path(tmp) / "results.jsonl", Path(tmp) / "k.db"))
        wall = time.perf_counter() - t0
        written = sum(1 for _ in open(Path(tmp) / "results.jsonl", encoding="utf-8"))
    return {"n": n, "file_mb": size_mb, "peak_mb": common.peak_rss_mb(), "before_mb": before, "wall_s": wall,
            "ok": stats.ok, "written": written}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1000,100000,1000000", help="line counts, comma-separated (default 1000,100000,1000000)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one N in this process, JSON out
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one)))
        return 0
    env = {**os.environ, "KSI_HOST_PLUGINS": "queue,retry,tokens"}
    rows, verdicts = [], []
    for n in (int(x) for x in args.n.split(",")):
        r = common.run_json([__file__, "--one", str(n)], env)
        rows.append([f"{r['n']:,}", r["file_mb"], r["before_mb"], r["peak_mb"], r["wall_s"], r["n"] / r["wall_s"],
                     "yes" if r["ok"] == r["written"] == r["n"] else "NO"])
        if r["n"] >= TARGET_LINES:
            verdicts.append((r["n"], r["peak_mb"], r["ok"] == r["written"] == r["n"]))
    print(f"runner_memory: ksi-host run's BatchRunner, tiny lines, instant in-process provider, real queue, retry and "
          f"tokens plugins on a database file; load average {common.load_average()}")
    print(common.table(["lines", "file MB", "RSS before run MB", "peak RSS MB", "wall s", "lines/s", "all ok"], rows))
    for n, peak, ok in verdicts:
        print(f"target <= {TARGET_MB} MB peak RSS for {n:,} lines, every line answered: "
              f"{common.verdict(peak <= TARGET_MB and ok)} ({peak:,.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
