"""overhead: the host against plain litellm and litellm's Router, on the same requests.

One local OpenAI-compatible server in its own process
(``python -m ksi_host.testing.server``, answers at once unless ``--delay``).
The same N requests (spread over S sessions), at concurrency 16, three ways:

* ``a litellm``: plain ``litellm.acompletion`` under an ``asyncio.Semaphore(16)``.
* ``b host``: ``ksi_host.Host`` with its four plugins (ksi-queue with a durable
  queue, ksi-provider-litellm, ksi-retry, ksi-tokens with its ledger) on a
  database file, ``[queue] concurrency = 16``; every request is submitted at once
  and the queue runs them (in session order).
* ``c router``: ``litellm.Router`` with retries and cooldowns configured
  (``num_retries=3``, ``allowed_fails=3``, ``cooldown_time=30``) under an
  ``asyncio.Semaphore(16)``.

One client process imports litellm once and warms each way up. Then, in each
of R rounds, every way runs the N requests in K slices, interleaved slice by
slice (a b c, then c b a, ...), so that load from elsewhere on the machine
falls on each way alike; a way's wall time is the sum of its slices. The ratios
compare the totals over all rounds. Targets: b/a <= 1.05 (the host adds at most
5 %), c/b >= 1.3 (the Router is at least 30 % slower than the host).

    python benchmarks/overhead.py [--n 1000] [--sessions 50] [--rounds 2] [--slices 8] [--delay 0]
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
import urllib.request
from pathlib import Path
from typing import Any

import common

MODEL = "gpt-bench"
KEY_ENV = "KSI_BENCH_KEY"
KEY = "sk-bench-not-a-real-key"
CONCURRENCY = 16
TARGET_HOST = 1.05
TARGET_ROUTER = 1.3


def requests(n: int, sessions: int, tag: str) -> list[dict[str, Any]]:
    return [{"model": MODEL, "session_id": f"{tag}-s{i % sessions}", "agent_id": "bench",
             "messages": [{"role": "user", "content": f"{tag} question {i}: what is {i} + {i}?"}]} for i in range(n)]


def hits(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_ksi/stats") as r:
        return int(json.load(r)["hits"])


class Ways:
    """The three ways of running a list of requests; each returns the answers' texts (None: failed)."""

    def __init__(self, url: str, host: Any, router: Any, litellm: Any) -> None:
        self.url = url
        self.host = host
        self.router = router
        self.litellm = litellm

    async def a_litellm(self, batch: list[dict[str, Any]]) -> list[str | None]:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(r: dict[str, Any]) -> str | None:
            async with slots:
                response = await self.litellm.acompletion(
                    model=f"openai/{MODEL}", messages=r["messages"], api_base=self.url, api_key=os.environ[KEY_ENV])
            return response.choices[0].message.content

        return await asyncio.gather(*map(one, batch))

    async def b_host(self, batch: list[dict[str, Any]]) -> list[str | None]:
        results = await asyncio.gather(*map(self.host.complete, batch))
        return [r.text if r.ok else None for r in results]

    async def c_router(self, batch: list[dict[str, Any]]) -> list[str | None]:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(r: dict[str, Any]) -> str | None:
            async with slots:
                response = await self.router.acompletion(model=MODEL, messages=r["messages"])
            return response.choices[0].message.content

        return await asyncio.gather(*map(one, batch))


async def run(url: str, n: int, sessions: int, rounds: int, slices: int, warmup: int, db_path: Path) -> dict[str, Any]:
    import ksi_host

    t0 = time.perf_counter()
    import litellm

    import_s = time.perf_counter() - t0
    litellm.suppress_debug_info = True
    router = litellm.Router(
        model_list=[{"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": url,
                                                             "api_key": os.environ[KEY_ENV]}}],
        num_retries=3, allowed_fails=3, cooldown_time=30,
    )
    config = {
        "queue": {"concurrency": CONCURRENCY},
        "litellm": {"mock": False, "deployments": [{"name": "local", "model": MODEL, "litellm_model": f"openai/{MODEL}",
                                                    "api_base": url, "api_key_env": KEY_ENV, "timeout_s": 60}]},
    }
    cases = {"a litellm": "a_litellm", "b host": "b_host", "c router": "c_router"}
    out: dict[str, list[dict[str, float]]] = {case: [] for case in cases}  # one entry per round
    size = -(-n // slices)
    async with ksi_host.Host(config, db_path) as host:
        ways = Ways(url, host, router, litellm)
        for method in cases.values():  # warm-up, not counted
            await getattr(ways, method)(requests(warmup, sessions, f"warm-{method}"))
        for i in range(rounds):
            batch = requests(n, sessions, f"r{i}")  # the same N requests for each way
            totals = {case: {"wall_s": 0.0, "cpu_s": 0.0, "ok": 0, "hits": 0} for case in cases}
            for k, start in enumerate(range(0, n, size)):
                order = list(cases.items()) if k % 2 == 0 else list(cases.items())[::-1]
                for case, method in order:
                    before = hits(url)
                    c0, t0 = time.process_time(), time.perf_counter()
                    texts = await getattr(ways, method)(batch[start:start + size])
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    tot = totals[case]
                    tot["wall_s"] += wall
                    tot["cpu_s"] += cpu
                    tot["ok"] += sum(t is not None for t in texts)
                    tot["hits"] += hits(url) - before
            for case in cases:
                out[case].append(totals[case])
        plugins = sorted(p.name for p in host.plugins)
    con = sqlite3.connect(db_path)
    stored = con.execute("SELECT COUNT(*) FROM ksi_queue_requests WHERE status = 'ok'").fetchone()[0]
    ledger = con.execute("SELECT COUNT(*) FROM token_usage").fetchone()[0]
    con.close()
    return {"cases": out, "import_s": import_s, "plugins": plugins, "stored_ok": stored, "ledger_rows": ledger,
            "host_requests": warmup + rounds * n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="requests per way and round (default 1000)")
    ap.add_argument("--sessions", type=int, default=50, help="sessions the requests are spread over (default 50)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the N requests per way (default 2)")
    ap.add_argument("--slices", type=int, default=8, help="slices per round, interleaved between the ways (default 8)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.0, help="the server's delay before each answer, seconds (default 0)")
    args = ap.parse_args()

    os.environ[KEY_ENV] = KEY
    os.environ["KSI_HOST_PLUGINS"] = common.PLUGINS
    with common.local_server(args.delay) as url, tempfile.TemporaryDirectory() as tmp:
        r = asyncio.run(run(url, args.n, args.sessions, args.rounds, args.slices, args.warmup, Path(tmp) / "overhead.db"))
    cases = r["cases"]
    print(f"overhead: {args.n:,} requests per way and round over {args.sessions} sessions, concurrency {CONCURRENCY}, "
          f"{args.rounds} round(s) of {args.slices} interleaved slices; local server in its own process, delay "
          f"{args.delay:g} s; host plugins: {', '.join(r['plugins'])}; load average {common.load_average()}")
    rows = []
    wall = {}
    for case, rs in cases.items():
        wall[case] = sum(x["wall_s"] for x in rs)
        cpu = sum(x["cpu_s"] for x in rs)
        total = args.n * len(rs)
        rows.append([case, f"{sum(x['ok'] for x in rs):,}/{total:,}", sum(x["hits"] for x in rs), wall[case],
                     " ".join(f"{x['wall_s']:.2f}" for x in rs), total / wall[case], cpu / total * 1e6])
    print(common.table(["way", "ok", "server hits", "wall s", "per round", "req/s", "client CPU us/req"], rows))
    durable = r["stored_ok"] == r["host_requests"] and r["ledger_rows"] == r["host_requests"]
    print(f"host database after the run: {r['stored_ok']:,} results stored ok, {r['ledger_rows']:,} ledger rows "
          f"(of {r['host_requests']:,} requests): {'all durable' if durable else 'MISSING ROWS'}")
    rounds_ba = " ".join(f"{b['wall_s'] / a['wall_s']:.3f}" for a, b in zip(cases["a litellm"], cases["b host"], strict=True))
    rounds_cb = " ".join(f"{c['wall_s'] / b['wall_s']:.3f}" for b, c in zip(cases["b host"], cases["c router"], strict=True))
    b_a = wall["b host"] / wall["a litellm"]
    c_b = wall["c router"] / wall["b host"]
    print(f"b/a host / plain litellm (wall): {b_a:.3f} (rounds: {rounds_ba})  target <= {TARGET_HOST}: "
          f"{common.verdict(b_a <= TARGET_HOST)}")
    print(f"c/b router / host (wall):        {c_b:.3f} (rounds: {rounds_cb})  target >= {TARGET_ROUTER}: "
          f"{common.verdict(c_b >= TARGET_ROUTER)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
