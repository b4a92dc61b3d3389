"""Cancel, clear a session, status: in the serving Host and from another (serve=False) Host."""

from __future__ import annotations

import asyncio
from typing import Any

import ksi_queue.plugin as queue_plugin
import pytest
from ksi_queue import Plugin
from queue_helpers import GatedProvider, req, rows, settle, status_of, stored_only

import ksi_host
from ksi_host.errors import ProviderUnavailable
from ksi_host.models import CompletionResult, FailureDecision
from ksi_host.testing import FakeProvider, ScriptedProviders


async def ksi_cancel(host: Any, request_id: str) -> bool | None:
    """The hook's own answer (``host.cancel`` folds None, unknown, into False)."""
    return await host.hooks.first("ksi_cancel", host=host, request_id=request_id)


async def test_cancel_a_queued_request(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        running = await host.submit(req("r0", "s1"))
        queued = await host.submit(req("r1", "s1"))
        after = await host.submit(req("r2", "s1"))
        await gate.wait_calls(1)
        assert await host.cancel("r1") is True
        assert status_of(ksi_db_path, "r1") == "cancelled"  # stored before cancel returned
        result = await queued.result()
        assert result.status == "cancelled" and result.error["type"] == "Cancelled" and result.session_id == "s1"
        gate.release_all()
        await asyncio.gather(running.result(), after.result())
        assert await host.cancel("r1") is False  # already final
        assert await host.cancel("r0") is False
        assert await ksi_cancel(host, "nobody") is None and await host.cancel("nobody") is False
    assert gate.calls == ["r0", "r2"]


async def test_cancel_a_running_request_frees_its_session(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        running = await host.submit(req("r0", "s1"))
        nxt = await host.submit(req("r1", "s1"))
        await gate.wait_calls(1)
        assert await host.cancel("r0") is True
        assert (await running.result()).status == "cancelled"
        await gate.wait_calls(2)  # the slot and the session moved on
        gate.release_all()
        assert (await nxt.result()).ok
    assert rows(ksi_db_path, "SELECT request_id, status FROM ksi_queue_requests ORDER BY seq") == [
        ("r0", "cancelled"), ("r1", "ok")]


class SwitchOnFailure:
    """A failure policy: every failed attempt is retried at once on another provider."""

    @ksi_host.hookimpl
    def ksi_handle_failure(self) -> FailureDecision:
        return FailureDecision.retry(0, switch_provider=True)


async def test_a_request_cancelled_mid_call_keeps_its_attempts_and_provider(make_host: Any) -> None:
    """The attempt that failed before, then the one cut short (Cancelled), in order, with the last one's provider:
    in the result the canceller's ticket gets, and in the one stored (a resubmit is answered from the table)."""
    gate = GatedProvider("second")
    first = FakeProvider("first", script=[ProviderUnavailable("upstream answered 500", provider="first")])
    async with make_host(Plugin(), ScriptedProviders(first, gate), SwitchOnFailure()) as host:
        ticket = await host.submit(req("r0"))
        await gate.wait_calls(1)
        assert await host.cancel("r0") is True
        for result in (await ticket.result(), await host.complete(req("r0")),
                       CompletionResult.from_dict((await host.request_details("r0"))["result"])):
            assert result.status == "cancelled" and result.provider == "second"
            assert [(a.number, a.provider, a.error_type) for a in result.attempts] == [
                (1, "first", "ProviderUnavailable"), (2, "second", "Cancelled")]
    assert gate.calls == ["r0"]


async def test_the_worker_that_ran_a_cancelled_request_runs_the_next_ones_with_working_timeouts(
        make_host: Any) -> None:
    """Requests run on a pool of workers (one per slot at most), not a task each; cancelling a running
    request interrupts its worker without ending it or leaving it 'cancelling' (asyncio.timeout works)."""
    timed_out: list[str] = []

    async def answer(request: Any) -> str:
        if request.request_id == "slow":
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.sleep(5)
            except TimeoutError:
                timed_out.append("slow")
        return "done"

    gate = GatedProvider()
    plugin = Plugin()
    quick = FakeProvider("quick", model="quick", script=[answer])
    async with make_host(plugin, ScriptedProviders(quick, gate), config={"queue": {"concurrency": 2}}) as host:
        running = await host.submit(req("r0", "s1"))
        await gate.wait_calls(1)
        worker = running_task = next(iter(plugin._workers))
        assert await host.cancel("r0") is True
        assert (await running.result()).status == "cancelled"
        await settle()
        assert not worker.done() and worker.cancelling() == 0
        results = await asyncio.gather(*(host.complete(req(f"q{i}", f"s{i % 3}", model="quick")) for i in range(40)),
                                       host.complete(req("slow", "s9", model="quick")))
        assert all(r.ok for r in results) and timed_out == ["slow"]
        assert len(plugin._workers) <= 2 and running_task in plugin._workers


async def test_clear_session_cancels_the_queued_and_lets_the_running_one_finish(make_host: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        a = [await host.submit(req(f"a{i}", "A")) for i in range(4)]
        b = await host.submit(req("b0", "B"))
        await gate.wait_calls(2)
        assert await host.clear_session("A") == 3
        assert await host.clear_session("A") == 0
        assert await host.clear_session("unknown") == 0
        gate.release_all()
        results = await asyncio.gather(*(t.result() for t in a), b.result())
    assert [r.status for r in results] == ["ok", "cancelled", "cancelled", "cancelled", "ok"]
    assert sorted(gate.calls) == ["a0", "b0"]


async def test_status_per_session_and_totals(make_host: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        tickets = [await host.submit(req(f"a{i}", "A")) for i in range(3)]
        tickets += [await host.submit(req("b0", "B")), await host.submit(req("n0"))]
        await gate.wait_calls(3)
        q = (await host.status())["queue"]
        assert (q["queued"], q["running"], q["sessions"], q["served_by_pid"] is not None) == (2, 3, 2, True)
        by = {s["session_id"]: s for s in q["by_session"]}
        assert (by["A"]["queued"], by["A"]["running"]) == (2, 1)
        assert (by["B"]["queued"], by["B"]["running"], by["B"]["oldest_wait_s"]) == (0, 1, None)
        assert (by[None]["queued"], by[None]["running"]) == (0, 1)
        assert by["A"]["oldest_wait_s"] >= 0 and q["oldest_wait_s"] == by["A"]["oldest_wait_s"]
        gate.release_all()
        await asyncio.gather(*(t.result() for t in tickets))
        q = (await host.status())["queue"]
        assert (q["queued"], q["running"], q["sessions"], q["by_session"]) == (0, 0, 0, [])


async def test_status_from_a_reading_host_reads_the_tables(make_host: Any, ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:  # store only: nobody serves
        for i in range(3):
            await host.submit(req(f"a{i}", "A"))
        await host.submit(req("n0"))
    async with make_host(Plugin(), serve=False) as reader:
        q = (await reader.status())["queue"]
    assert (q["queued"], q["running"], q["sessions"], q["served_by_pid"]) == (4, 0, 1, None)
    assert [(s["session_id"], s["queued"]) for s in q["by_session"]] == [(None, 1), ("A", 3)]


async def test_cancel_and_clear_on_a_stopped_queue_edit_the_rows(make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1")
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        for i in range(3):
            await host.submit(req(f"a{i}", "A"))
        await host.submit(req("b0", "B"))
    async with make_host(Plugin(), serve=False) as cli:
        assert await cli.cancel("b0") is True
        assert await cli.cancel("b0") is False
        assert await ksi_cancel(cli, "nobody") is None
        assert await cli.clear_session("A") == 3
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        await settle()
        assert (await host.complete(req("b0", "B"))).status == "cancelled"
    assert provider.calls == []


async def test_cancel_from_another_host_goes_through_the_serving_one(make_host: Any, ksi_db_path: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_plugin, "COMMAND_POLL_S", 0.01)
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as server:
        tickets = [await server.submit(req(f"a{i}", "A")) for i in range(4)]
        await gate.wait_calls(1)
        async with make_host(Plugin(), serve=False) as cli:  # as `ksi-host cancel` would, in another process
            q = (await cli.status())["queue"]
            assert q["served_by_pid"] is not None and q["queued"] + q["running"] == 4
            assert await cli.cancel("a1") is True
            assert await ksi_cancel(cli, "nobody") is None
            assert await cli.clear_session("A") == 2
            assert await cli.cancel("a0") is True  # the running one, through the serving process
            with pytest.raises(queue_plugin.ServedElsewhere):
                await cli.submit(req("x", "A"))
        results = await asyncio.gather(*(t.result() for t in tickets))
    assert [r.status for r in results] == ["cancelled"] * 4
    assert gate.calls == ["a0"]


async def test_a_second_serving_host_on_the_same_database_is_refused(make_host: Any) -> None:
    from ksi_host.errors import StartupError

    async with make_host(Plugin()):
        with pytest.raises(StartupError, match="already serves"):
            async with make_host(Plugin()):
                pass
    async with make_host(Plugin()):  # once stopped, the database is free again
        pass


async def test_the_owner_row_of_a_dead_process_is_taken_over(make_host: Any, ksi_db_path: Any) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        await host.db.execute("INSERT INTO ksi_queue_owner (id, pid, process_start, started_at) VALUES (1, ?, NULL, 0)",
                              (dead.pid,))
        assert (await host.status())["queue"]["served_by_pid"] is None
    async with make_host(Plugin()) as host:
        assert (await host.status())["queue"]["served_by_pid"] is not None
