"""Time to first token through the host against the same provider called directly.

One local OpenAI-compatible server (``python -m ksi_host.testing.server``, its
own process) that waits a fixed ``--delay`` (default 20 ms) between a stream's
headers and its first chunk. In one client process, N streamed requests, one at
a time, interleaved pair by pair (the order of the two swapped every pair):

* ``host``: ``host.stream(...)`` through a Host with the real queue plugin, the
  openai provider plugin, the retry and tokens plugins (``--plugins``) on a
  database file: the request stored, its turn taken, the ledger row written
  before the call, the pieces handed over from the attempt to the consumer;
* ``direct``: the openai plugin's provider object, ``stream()`` called without a
  host (its own pooled client, the same deployment config).

TTFT runs from the call until the first piece with content reaches the caller.
Prints p50 and p99 of each, and of the difference host - direct pair by pair;
the target is that the host adds at most 1 ms at the median.

    python benchmarks/ttft.py [-n 300] [--delay 0.02] [--warmup 30] [--plugins queue,openai,retry,tokens]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, verdict  # noqa: E402

MODEL = "gpt-ttft"
TARGET_MS = 1.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def first_piece(pieces: object, t0: float) -> float:
    """Milliseconds from ``t0`` to the first piece with content; the rest read to the end."""
    ttft = None
    async for delta in pieces:  # type: ignore[attr-defined]
        if ttft is None and delta.content:
            ttft = (time.perf_counter() - t0) * 1000
    assert ttft is not None, "no content came"
    return ttft


async def run(url: str, n: int, warmup: int, plugins: str) -> dict[str, list[float]]:
    os.environ["KSI_HOST_PLUGINS"] = plugins
    from ksi_provider_openai.client import HttpClient
    from ksi_provider_openai.config import OpenAIConfig, OpenAIDeployment
    from ksi_provider_openai.plugin import build_pool

    from ksi_host import CompletionRequest, Host

    deployment = {"name": "oa-main", "model": MODEL, "api_base": url, "timeout_s": 30}
    client = HttpClient()
    direct = build_pool(OpenAIConfig(deployments=[OpenAIDeployment(**deployment)]), client,
                        clock=time.monotonic).get("oa-main")
    assert direct is not None
    times: dict[str, list[float]] = {"host": [], "direct": []}
    with tempfile.TemporaryDirectory() as tmp:
        async with Host({"openai": {"deployments": [deployment]}}, Path(tmp) / "ttft.db") as host:
            async def via_host(i: int) -> float:
                t0 = time.perf_counter()
                return await first_piece(host.stream({"model": MODEL, "prompt": f"hello there {i}"}), t0)

            async def via_provider(i: int) -> float:
                request = CompletionRequest(model=MODEL, messages=({"role": "user", "content": f"hello there {i}"},))
                t0 = time.perf_counter()
                return await first_piece(direct.stream(request, timeout_s=None), t0)

            for i in range(warmup + n):
                pair = (("host", via_host), ("direct", via_provider))
                for name, call in pair if i % 2 == 0 else reversed(pair):
                    ms = await call(i)
                    if i >= warmup:
                        times[name].append(ms)
    await client.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=300, help="pairs measured (default 300)")
    ap.add_argument("--warmup", type=int, default=30, help="pairs first, not counted (default 30)")
    ap.add_argument("--delay", type=float, default=0.02, help="the server's wait before a stream's first chunk, s")
    ap.add_argument("--plugins", default="queue,openai,retry,tokens", help="the host's plugins (KSI_HOST_PLUGINS)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run against --one URL, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(run(args.one, args.n, args.warmup, args.plugins))))
        return 0
    server = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0",
                               "--first-chunk-delay", str(args.delay)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = json.loads(server.stdout.readline())["url"]
        p = subprocess.run([sys.executable, __file__, "--one", url, "-n", str(args.n), "--warmup", str(args.warmup),
                            "--plugins", args.plugins], capture_output=True, text=True)
    finally:
        server.terminate()
        server.wait()
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        return 1
    times = json.loads(p.stdout.strip().splitlines()[-1])
    diff = [h - d for h, d in zip(times["host"], times["direct"], strict=True)]
    rows = [[name, len(v), statistics.median(v), percentile(v, 99), min(v), max(v)]
            for name, v in (("host", times["host"]), ("direct", times["direct"]), ("host - direct", diff))]
    print(f"{args.n} streamed requests each, one at a time, interleaved; server delay before the first chunk "
          f"{args.delay * 1000:g} ms; host plugins {args.plugins}; times in ms")
    print(table(["", "n", "p50", "p99", "min", "max"], rows))
    added = statistics.median(diff)
    print(f"the host adds {added:.3f} ms at the median (p99 {percentile(diff, 99):.3f} ms): "
          f"target <= {TARGET_MS:g} ms {verdict(added <= TARGET_MS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
