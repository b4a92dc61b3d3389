"""Scheduling through a Host: session order, concurrency, limits, priority."""

from __future__ import annotations

import asyncio
from typing import Any

from ksi_queue import Plugin
from queue_helpers import GatedProvider, req, settle, status_of

from ksi_host.testing import ScriptedProviders


async def test_a_session_runs_one_at_a_time_in_submission_order(make_host: Any, ksi_db_path: Any) -> None:
    seen: list[tuple[str, str | None]] = []

    def on_call(request: Any) -> None:  # when r(k) reaches the provider, r(k-1) is already stored as final
        k = int(request.request_id[1:])
        seen.append((request.request_id, status_of(ksi_db_path, f"r{k - 1}") if k else None))

    gate = GatedProvider(on_call=on_call)
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        tickets = [await host.submit(req(f"r{i}", "s1")) for i in range(4)]
        for i in range(4):
            await gate.wait_calls(i + 1)
            await settle()
            assert gate.calls == [f"r{k}" for k in range(i + 1)]  # the next one waits for this one
            assert gate.active == 1
            gate.release(f"r{i}")
        results = [await t.result() for t in tickets]
    assert [r.request_id for r in results] == ["r0", "r1", "r2", "r3"]
    assert seen == [("r0", None), ("r1", "ok"), ("r2", "ok"), ("r3", "ok")]


async def test_different_sessions_and_sessionless_requests_run_concurrently(make_host: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        tickets = [await host.submit(req(f"s{i}", f"session-{i}")) for i in range(3)]
        tickets += [await host.submit(req(f"n{i}")) for i in range(3)]
        await gate.wait_calls(6)
        assert gate.active == 6
        gate.release_all()
        assert all(r.ok for r in await asyncio.gather(*(t.result() for t in tickets)))


async def test_the_global_limit_bounds_requests_in_flight(make_host: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 3}}) as host:
        tickets = [await host.submit(req(f"r{i}", f"s{i}")) for i in range(10)]
        await gate.wait_calls(3)
        await settle()
        assert gate.active == 3 and len(gate.calls) == 3
        status = (await host.status())["queue"]
        assert status["in_flight"] == 3 and status["running"] == 3 and status["queued"] == 7
        gate.release_all()
        assert all(r.ok for r in await asyncio.gather(*(t.result() for t in tickets)))
    assert gate.max_active == 3


async def test_the_host_concurrency_setting_is_the_limit(make_host: Any) -> None:
    gate = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(gate), config={"host": {"concurrency": 2}}) as host:
        gate.open = False
        tickets = [await host.submit(req(f"r{i}")) for i in range(5)]
        await gate.wait_calls(2)
        await settle()
        assert gate.active == 2
        gate.release_all()
        await asyncio.gather(*(t.result() for t in tickets))
    assert gate.max_active == 2


async def test_a_model_limit_bounds_that_model_only(make_host: Any) -> None:
    gate = GatedProvider()
    config = {"queue": {"concurrency": 10, "model_limits": {"slow": 2}}}
    async with make_host(Plugin(), ScriptedProviders(gate), config=config) as host:
        slow = [await host.submit(req(f"slow{i}", model="slow")) for i in range(5)]
        fast = [await host.submit(req(f"fast{i}", model="fast")) for i in range(3)]
        await gate.wait_calls(5)
        await settle()
        assert sorted(gate.calls) == ["fast0", "fast1", "fast2", "slow0", "slow1"]
        gate.release("slow0")
        await gate.wait_calls(6)
        assert gate.calls[-1] == "slow2"  # a freed slot of the model goes to its next request
        gate.release_all()
        assert all(r.ok for r in await asyncio.gather(*(t.result() for t in slow + fast)))


async def test_priority_decides_what_runs_next_when_limited(make_host: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        first = await host.submit(req("first"))
        await gate.wait_calls(1)
        waiting = [await host.submit(req(f"{p}-{i}", priority=p))
                   for i, p in enumerate(["background", "low", "normal", "high", "critical", "normal", "critical"])]
        gate.release_all()
        await asyncio.gather(first.result(), *(t.result() for t in waiting))
    assert gate.calls == ["first", "critical-4", "critical-6", "high-3", "normal-2", "normal-5", "low-1", "background-0"]


async def test_priority_never_reorders_a_session(make_host: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        blocker = await host.submit(req("blocker"))
        await gate.wait_calls(1)
        tickets = [
            await host.submit(req("a-low", "A", priority="low")),
            await host.submit(req("a-critical", "A", priority="critical")),
            await host.submit(req("b-high", "B", priority="high")),
        ]
        gate.release_all()
        await asyncio.gather(blocker.result(), *(t.result() for t in tickets))
    # a-critical waits behind a-low, its session's earlier request; b-high outranks a-low
    assert gate.calls == ["blocker", "b-high", "a-low", "a-critical"]
