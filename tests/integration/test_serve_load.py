"""``ksi-host serve`` under more load than its configured depth: 429 with Retry-After, and memory that stays flat."""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from pathlib import Path

import aiohttp
from ksi_serve.testing import ServeProcess, toml

from ksi_host.testing.server import OpenAIServer

MAX_PENDING = 100
WAVES = 6
PER_WAVE = 1000
BODY_PADDING = 20_000  # bytes of prompt per request: 6,000 of them kept would be 120 MB


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def test_a_full_server_answers_429_and_its_memory_stays_flat(tmp_path: Path):
    upstream = OpenAIServer(delay_s=1.0, keep_bodies=False).start_in_thread()
    try:
        cfg = tmp_path / "ksi.toml"
        cfg.write_text(toml({
            "serve": {"max_pending": MAX_PENDING, "retry_after_s": 2},
            "queue": {"concurrency": 32},
            "openai": {"deployments": [{"name": "local", "model": "gpt-*", "api_base": upstream.url, "timeout_s": 30.0}]},
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
        env.update(KSI_HOST_PLUGINS="queue,openai,retry,tokens,serve", OTEL_TRACES_EXPORTER="none")
        with ServeProcess(cfg, tmp_path / "ksi.db", env=env) as served:
            statuses, rss, pending = asyncio.run(_waves(served))
    finally:
        upstream.stop_thread()
    ok, full = statuses[200], statuses[429]
    print(f"answers by status {dict(statuses)}; pending after each wave {pending}; RSS (MB) {rss}")
    assert set(statuses) == {200, 429}, statuses
    assert full > (WAVES - 1) * PER_WAVE // 2 and ok >= MAX_PENDING  # most were refused; every accepted one answered
    assert max(pending) <= MAX_PENDING  # the gauge never passed the depth
    assert upstream.hits == ok  # nothing refused reached the upstream
    growth = rss[-1] - rss[1]  # after the first wave (the allocator's first growth), memory stays flat
    assert growth < 25, f"RSS after each wave (MB): {rss}"


async def _waves(served: ServeProcess) -> tuple[Counter[int], list[float], list[int]]:
    statuses: Counter[int] = Counter()
    rss: list[float] = []
    pending: list[int] = []
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * BODY_PADDING}]}
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as http:
        accepted: list[asyncio.Task[int]] = []

        async def call() -> int:
            async with http.post(f"{served.url}/chat/completions", json=body) as resp:
                await resp.read()
                if resp.status == 429:
                    assert resp.headers["Retry-After"] == "2" and resp.headers["x-should-retry"] == "true"
                return resp.status

        for _ in range(WAVES):
            wave = [asyncio.ensure_future(call()) for _ in range(PER_WAVE)]
            done, _ = await asyncio.wait(wave, timeout=0.5)  # the refused answer at once; the accepted wait
            for t in wave:
                if t in done and t.result() == 429:
                    statuses[429] += 1
                else:
                    accepted.append(t)
            async with http.get(f"{served.base}/metrics") as resp:
                text = await resp.text()
            pending.append(int(re.search(r"^ksi_serve_pending (\d+)$", text, re.M).group(1)))
            rss.append(rss_mb(served.pid))
        for status in await asyncio.gather(*accepted):
            statuses[status] += 1
    return statuses, rss, pending
