"""Helpers of the ksi-limits tests: virtual time, a provider that logs what reached it, a ledger stand-in."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable
from typing import Any

import attrs
from ksi_limits.store import LocalWindowStore

from ksi_host import ProviderResponse, Usage, hookimpl
from ksi_host.testing import FakeProvider


class VirtualTime:
    """A clock and a sleep for ``Host(clock=..., sleep=...)``: time moves only when every task waits.

    ``run(aw)`` drives the loop: it lets every runnable task run, then moves the clock to the earliest
    sleeper's wake-up time and wakes it, until ``aw`` is done.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, delay), next(self._order), fut))
        await fut

    async def _settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def run(self, aw: Awaitable[Any], stuck_s: float = 5.0) -> Any:
        """Drive the loop until ``aw`` is done; AssertionError if nothing can move for ``stuck_s`` real seconds."""
        task = asyncio.ensure_future(aw)
        idle_since = None
        while not task.done():
            await self._settle()
            if task.done():
                break
            while self._sleepers and self._sleepers[0][2].done():  # cancelled sleepers
                heapq.heappop(self._sleepers)
            if not self._sleepers:  # something waits on real I/O, or nothing can move
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > stuck_s:
                    task.cancel()
                    raise AssertionError(f"stuck: nothing sleeps and nothing runs (at virtual time {self.now})")
                await asyncio.sleep(0.001)
                continue
            idle_since = None
            t, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, t)
            fut.set_result(None)
        return task.result()


@attrs.define
class Sent:
    """One call as the upstream saw it: when it arrived, when it ended, the tokens it used."""

    request_id: str
    agent_id: str | None
    at: float
    ended: float
    tokens: int


class LoggingProvider(FakeProvider):
    """A deployment that takes ``latency`` seconds (of ``clock``/``sleep``) and logs every call in ``sent``.

    ``usage(request)`` gives the usage it reports (default: 10 prompt + 5 completion tokens).
    """

    def __init__(self, name: str, clock: Any, sleep: Any, *, latency: float = 0.0, usage: Any = None,
                 model: str = "*") -> None:
        super().__init__(name, model)
        self.clock, self.pause, self.latency = clock, sleep, latency
        self.usage_of = usage or (lambda request: Usage(10, 5, 15))
        self.sent: list[Sent] = []
        self.script = [self._answer]

    async def _answer(self, request: Any) -> ProviderResponse:
        at = self.clock()
        if self.latency:
            await self.pause(self.latency)
        usage = self.usage_of(request)
        self.sent.append(Sent(request.request_id, request.agent_id, at, self.clock(),
                              0 if usage is None else usage.total_tokens))
        return ProviderResponse("ok", usage=usage)


def most_in_any_window(sent: list[Sent], window_s: float, *, tokens: bool = True) -> int:
    """The most tokens (or requests) that arrived within any ``window_s`` seconds ([t, t + window_s))."""
    times = sorted((s.at, s.tokens if tokens else 1) for s in sent)
    most = 0
    for i, (t, _) in enumerate(times):
        most = max(most, sum(n for u, n in times[i:] if u < t + window_s))
    return most


class AwaitingStore:
    """A LocalWindowStore behind awaitable answers that pause first, as a store shared by hosts would (its
    operations go over the network), with ``poll_s`` set: the plugin's path for such a store."""

    shared = True

    def __init__(self, sleep: Any, poll_s: float | None = 30.0, answer_after_s: float = 0.0) -> None:
        self.inner = LocalWindowStore()
        self.sleep = sleep
        self.poll_s = poll_s
        self.answer_after_s = answer_after_s  # real seconds between doing the operation and answering
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            await asyncio.sleep(0)
            done = method(*args, **kw)
            if self.answer_after_s:
                await asyncio.sleep(self.answer_after_s)
            return done

        return call


class FakeLedger:
    """``ksi_usage_report`` from a list of rows per ``by``, answered after ``delay_s`` real seconds; ``asked``
    lists the questions."""

    def __init__(self, rows: dict[str, list[dict[str, Any]]] | None = None, delay_s: float = 0.0) -> None:
        self.rows = rows or {}
        self.delay_s = delay_s
        self.asked: list[tuple[str, float | None]] = []

    @hookimpl
    async def ksi_usage_report(self, by: str, since: float | None) -> list[dict[str, Any]]:
        self.asked.append((by, since))
        await asyncio.sleep(self.delay_s)
        return [dict(r) for r in self.rows.get(by, [])]


def row(key: Any, *, cost: float | None = None, calls: int = 0, tokens: int = 0, unpriced: int = 0) -> dict[str, Any]:
    return {"key": key, "calls": calls, "requests": calls, "prompt_tokens": tokens, "completion_tokens": 0,
            "total_tokens": tokens, "cost_usd": cost, "unpriced_calls": unpriced}
