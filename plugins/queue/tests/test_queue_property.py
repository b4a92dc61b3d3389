"""Property: random interleavings of submissions across sessions keep each session's order."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ksi_queue import Plugin
from queue_helpers import req

from ksi_host import Host
from ksi_host.models import PRIORITIES, ProviderResponse, Ticket
from ksi_host.testing import ScriptedProviders


class YieldingProvider:
    """Answers after yielding to the event loop a scripted number of times; logs starts and ends."""

    name = "yielding"
    model = "*"
    timeout_s = None

    def __init__(self, yields: dict[str, int], tickets: dict[str, Ticket], previous: dict[str, str]) -> None:
        self.yields = yields
        self.tickets = tickets
        self.previous = previous
        self.log: list[tuple[str, str]] = []
        self.active = 0
        self.max_active = 0
        self.violations: list[str] = []

    async def complete(self, request: Any, *, timeout_s: float | None) -> ProviderResponse:
        rid = request.request_id
        prev = self.previous.get(rid)
        if prev is not None and not self.tickets[prev].is_done():  # its result must be final (stored) first
            self.violations.append(f"{rid} started before {prev} was final")
        self.log.append(("start", rid))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for _ in range(self.yields[rid]):
            await asyncio.sleep(0)
        self.active -= 1
        self.log.append(("end", rid))
        return ProviderResponse(text=rid)


SESSIONS = st.sampled_from(["A", "B", "C", None])
STEPS = st.lists(
    st.tuples(SESSIONS, st.sampled_from(list(PRIORITIES)), st.integers(0, 3), st.integers(0, 4)),
    min_size=1, max_size=24,
)


async def scenario(steps: list[tuple[str | None, str, int, int]], concurrency: int, db_path: Path) -> None:
    tickets: dict[str, Ticket] = {}
    previous: dict[str, str] = {}
    last_of: dict[str, str] = {}
    yields: dict[str, int] = {}
    order: dict[str | None, list[str]] = {}
    provider = YieldingProvider(yields, tickets, previous)
    config = {"queue": {"concurrency": concurrency}}
    async with Host(config, db_path, plugins=[Plugin(), ScriptedProviders(provider)]) as host:
        for i, (session, priority, gap, work) in enumerate(steps):
            rid = f"r{i}"
            yields[rid] = work
            if session is not None:
                if session in last_of:
                    previous[rid] = last_of[session]
                last_of[session] = rid
            order.setdefault(session, []).append(rid)
            for _ in range(gap):  # interleave submissions with running work
                await asyncio.sleep(0)
            tickets[rid] = await host.submit(req(rid, session, priority=priority))
        results = await asyncio.gather(*(t.result() for t in tickets.values()))
    assert [r.text for r in results] == list(tickets)
    assert provider.violations == []
    starts = [rid for kind, rid in provider.log if kind == "start"]
    assert sorted(starts) == sorted(tickets)  # each request sent exactly once
    for session, rids in order.items():
        if session is None:
            continue
        assert [rid for rid in starts if rid in set(rids)] == rids  # the session's submission order
        for a, b in zip(rids, rids[1:], strict=False):  # one at a time: b starts after a ended
            assert provider.log.index(("end", a)) < provider.log.index(("start", b))
    assert provider.max_active <= concurrency


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, concurrency=st.integers(1, 4))
def test_random_interleavings_keep_each_sessions_order(steps: list[tuple[str | None, str, int, int]],
                                                       concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(steps, concurrency, Path(tmp) / "q.db"))
