"""Run by test_queue_sigkill.py in a subprocess: a Host with ksi-queue and a slow
provider that appends every call's request id to a log file before answering.

    python sigkill_worker.py DB LOG N SESSIONS DELAY_S CONCURRENCY

Submits N requests over SESSIONS sessions (fixed ids, so running it again on the
same database resubmits the same requests), prints ``SUBMITTED`` once every
submit returned (the requests are durable), waits for every result and prints
``DONE <json>``. Run again after a SIGKILL, it first prints ``RESTORED <n>``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from ksi_queue import Plugin

from ksi_host import Host, hookimpl
from ksi_host.models import CompletionRequest, ProviderResponse


class SlowLoggingProvider:
    name = "slow"
    model = "*"
    timeout_s = None

    def __init__(self, log_path: str, delay_s: float) -> None:
        self.log_path = log_path
        self.delay_s = delay_s

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse:
        with open(self.log_path, "a", encoding="utf-8") as f:  # in the kernel before the "upstream" answers
            f.write(request.request_id + "\n")
        await asyncio.sleep(self.delay_s)
        return ProviderResponse(text=f"done {request.request_id}")


class Providers:
    def __init__(self, provider: SlowLoggingProvider) -> None:
        self.provider = provider

    @hookimpl
    def ksi_select_provider(self, request: CompletionRequest, exclude: frozenset[str]) -> SlowLoggingProvider:
        return self.provider


def requests(n: int, sessions: int) -> list[CompletionRequest]:
    return [
        CompletionRequest(model="m", messages=[{"role": "user", "content": f"step {i // sessions}"}],
                          request_id=f"s{i % sessions}-{i // sessions:03d}", session_id=f"s{i % sessions}")
        for i in range(n)
    ]


async def main(db: str, log: str, n: int, sessions: int, delay_s: float, concurrency: int) -> None:
    config = {"queue": {"concurrency": concurrency}}
    async with Host(config, db, plugins=[Plugin(), Providers(SlowLoggingProvider(log, delay_s))]) as host:
        q = (await host.status())["queue"]
        print("RESTORED", q["queued"] + q["running"], flush=True)
        tickets = [await host.submit(r) for r in requests(n, sessions)]
        print("SUBMITTED", flush=True)
        results = await asyncio.gather(*(t.result() for t in tickets))
        print("DONE", json.dumps({r.request_id: r.status for r in results}), flush=True)


if __name__ == "__main__":
    db, log, n, sessions, delay_s, concurrency = sys.argv[1:7]
    asyncio.run(main(db, log, int(n), int(sessions), float(delay_s), int(concurrency)))
