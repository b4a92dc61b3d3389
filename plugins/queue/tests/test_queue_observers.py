"""Observers see the queue's own results (issue 21): a cancel (queued, running, restored, offline) and a cleared
session are reported with ``host.request_finished`` exactly once, with the request as submitted, before the
result is stored; a cancel that arrives while the observers look at the host's own result is too late."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ksi_queue import Plugin
from queue_helpers import GatedProvider, req, settle, status_of, stored_only

from ksi_host import hookimpl
from ksi_host.models import CompletionRequest, CompletionResult
from ksi_host.testing import ScriptedProviders


class Observer:
    """Records every ``ksi_request_finished``: (request, result, the row's status at that moment)."""

    def __init__(self, db_path: Any = None) -> None:
        self.db_path = db_path
        self.seen: list[tuple[CompletionRequest, CompletionResult, str | None]] = []
        self.hold: dict[str, asyncio.Event] = {}  # request id -> wait for it before returning

    @hookimpl
    async def ksi_request_finished(self, request: CompletionRequest, result: CompletionResult) -> None:
        row = status_of(self.db_path, request.request_id) if self.db_path is not None else None
        self.seen.append((request, result, row))
        hold = self.hold.get(request.request_id)
        if hold is not None:
            await hold.wait()

    def statuses(self) -> list[tuple[str, str]]:
        return [(result.request_id, result.status) for _, result, _ in self.seen]


async def test_a_cancelled_request_is_reported_once_before_it_is_stored(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    observer = Observer(ksi_db_path)
    async with make_host(Plugin(), ScriptedProviders(gate), observer, config={"queue": {"concurrency": 1}}) as host:
        tickets = [await host.submit(req(rid, "s1", agent_id="ag")) for rid in ("run", "queued", "after")]
        await gate.wait_calls(1)
        assert await host.cancel("queued") is True
        assert await host.cancel("run") is True  # running
        gate.release_all()
        results = [await t.result() for t in tickets]
        assert await host.cancel("queued") is False  # final: nothing new to report
    assert [r.status for r in results] == ["cancelled", "cancelled", "ok"]
    assert observer.statuses() == [("queued", "cancelled"), ("run", "cancelled"), ("after", "ok")]
    for (request, result, row_status), sent in zip(observer.seen, (req("queued", "s1", agent_id="ag"),
                                                                   req("run", "s1", agent_id="ag")), strict=False):
        assert request == sent and result.submitted_at is not None
        assert row_status in ("queued", "running")  # reported before it was stored
    assert [r for _, r, _ in observer.seen[:2]] == [results[1], results[0]]


async def test_a_cleared_session_reports_each_cancelled_request(make_host: Any) -> None:
    gate = GatedProvider()
    observer = Observer()
    async with make_host(Plugin(), ScriptedProviders(gate), observer) as host:
        tickets = [await host.submit(req(f"r{i}", "s1")) for i in range(4)]
        await gate.wait_calls(1)
        assert await host.clear_session("s1") == 3
        gate.release_all()
        await asyncio.gather(*(t.result() for t in tickets))
    assert sorted(observer.statuses()) == [("r0", "ok"), ("r1", "cancelled"), ("r2", "cancelled"), ("r3", "cancelled")]


async def test_a_restored_request_is_loaded_from_the_table_to_be_reported(make_host: Any, ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    sent = req("old", "s1", purpose="restore me", metadata={"k": 1})
    async with make_host(Plugin(), serve=False) as host:
        await host.submit(req("first", "s1"))
        await host.submit(sent)
    gate = GatedProvider()
    observer = Observer()
    async with make_host(Plugin(), ScriptedProviders(gate), observer) as host:
        await gate.wait_calls(1)  # "first" runs; "old" waits, its request still in the table
        assert await host.cancel("old") is True
        gate.release_all()
        await settle()
    assert observer.statuses()[0] == ("old", "cancelled")
    assert observer.seen[0][0] == sent


async def test_an_offline_cancel_and_clear_are_reported_by_the_host_that_made_them(make_host: Any,
                                                                                    ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        for rid, sid in (("a", "s1"), ("b", "s2"), ("c", "s2"), ("d", "s3")):
            await host.submit(req(rid, sid))
    observer = Observer()
    async with make_host(Plugin(), observer, serve=False) as host:  # nobody serves: the rows are edited here
        assert await host.cancel("a") is True
        assert await host.clear_session("s2") == 2
        assert await host.cancel("a") is False
    assert observer.statuses() == [("a", "cancelled"), ("b", "cancelled"), ("c", "cancelled")]
    assert [request for request, _, _ in observer.seen] == [req("a", "s1"), req("b", "s2"), req("c", "s2")]
    assert status_of(ksi_db_path, "d") == "queued"
    async with make_host(Plugin(), serve=False) as host:  # what the observers saw is what is stored
        for _, result, _ in observer.seen:
            assert (await host.request_details(result.request_id))["result"] == result.to_dict()


async def test_a_cancel_while_the_observers_look_at_the_result_is_too_late(make_host: Any) -> None:
    """host.execute reports its result, an observer waits: the request is final, a cancel then changes nothing
    (the observers never see two results of one request)."""
    gate = GatedProvider(open=True)
    observer = Observer()
    observer.hold["r0"] = asyncio.Event()
    async with make_host(Plugin(), ScriptedProviders(gate), observer) as host:
        ticket = await host.submit(req("r0"))
        while not observer.seen:
            await asyncio.sleep(0.001)
        try:
            assert await asyncio.wait_for(host.cancel("r0"), 5) is False
        finally:
            observer.hold["r0"].set()
        assert (await ticket.result()).ok
    assert observer.statuses() == [("r0", "ok")]


async def test_an_observer_bug_on_a_cancel_reaches_the_canceller_and_the_row_stays_unfinished(
        make_host: Any, ksi_db_path: Any) -> None:
    class Broken:
        @hookimpl
        def ksi_request_finished(self, result: CompletionResult) -> None:
            if result.status == "cancelled":
                raise KeyError("observer bug")

    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), Broken()) as host:
        await host.submit(req("r0", "s1"))
        waiting = await host.submit(req("r1", "s1"))
        await gate.wait_calls(1)
        with pytest.raises(KeyError, match="observer bug"):
            await host.cancel("r1")
        with pytest.raises(KeyError, match="observer bug"):  # its submitter's ticket too
            await waiting.result()
        gate.release_all()
        await settle()
    assert status_of(ksi_db_path, "r1") == "queued"  # runs again at the next start
