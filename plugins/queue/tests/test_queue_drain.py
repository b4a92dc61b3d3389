"""``ksi_drain`` (``host.drain()``: the first Ctrl-C of ``ksi-host run``): nothing starts after it began; the
requests running then finish, are stored and their tickets complete before it returns; queued ones stay
stored unfinished and run at the next start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ksi_queue import Plugin
from queue_helpers import GatedProvider, req, settle, status_of

from ksi_host.errors import Cancelled
from ksi_host.testing import ScriptedProviders


async def test_a_drain_lets_the_running_requests_finish_and_starts_nothing(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    plugin = Plugin()
    async with make_host(plugin, ScriptedProviders(gate), config={"queue": {"concurrency": 2}}) as host:
        running = [await host.submit(req(rid, sid)) for rid, sid in (("r0", "a"), ("r1", "b"))]
        queued = [await host.submit(req(rid, sid)) for rid, sid in (("q0", "a"), ("q1", "c"))]
        await gate.wait_calls(2)
        drain = asyncio.ensure_future(host.drain())
        await settle()
        assert not drain.done()  # r0 and r1 are still running
        late = await host.submit(req("late", "d"))  # accepted and stored, not started
        gate.release("r0")
        await settle()
        assert not drain.done() and gate.calls == ["r0", "r1"]  # r0's slot is free: nothing takes it
        gate.release("r1")
        await asyncio.wait_for(drain, 5)
        assert [(await t.result()).status for t in running] == ["ok", "ok"]  # done when the drain returns
        assert [status_of(ksi_db_path, rid) for rid in ("r0", "r1", "q0", "q1", "late")] == [
            "ok", "ok", "queued", "queued", "queued"]
        assert plugin.sched.in_flight == 0
        assert not any(t.is_done() for t in queued + [late])
        await host.drain()  # again: nothing runs, it returns at once
    assert gate.calls == ["r0", "r1"]
    for t in queued + [late]:  # the shutdown after the drain: nothing was running, the rest stays stored
        with pytest.raises(Cancelled, match="stays stored"):
            await t.result()
    assert [status_of(ksi_db_path, rid) for rid in ("q0", "q1", "late")] == ["queued"] * 3

    gate = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:  # the next start runs them
        results = [await host.complete(req(rid, sid)) for rid, sid in (("q0", "a"), ("q1", "c"), ("late", "d"))]
    assert [r.ok for r in results] == [True] * 3 and sorted(gate.calls) == ["late", "q0", "q1"]


async def test_a_drain_waits_for_a_cancel_being_stored_and_cancels_still_work(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        first = await host.submit(req("r0", "s"))
        await host.submit(req("r1", "s"))
        await gate.wait_calls(1)
        drain = asyncio.ensure_future(host.drain())
        await settle()
        assert await host.cancel("r1") is True  # queued: cancelled and stored during the drain
        await settle()
        assert not drain.done()  # r0 runs
        assert await host.cancel("r0") is True  # running: the drain returns once its cancelled result is stored
        await asyncio.wait_for(drain, 5)
        assert (await first.result()).status == "cancelled"
        assert [status_of(ksi_db_path, rid) for rid in ("r0", "r1")] == ["cancelled", "cancelled"]
    assert gate.calls == ["r0"]

