"""Running marks: written for requests still running MARK_DELAY_S after they started, never for quick ones."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ksi_queue import Plugin, store
from queue_helpers import GatedProvider, req, rows, status_of

from ksi_host.testing import FakeProvider, ScriptedProviders

LOG_MARKS = [
    "CREATE TABLE mark_log (seq INTEGER NOT NULL)",
    "CREATE TRIGGER mark_log_running AFTER UPDATE OF status ON ksi_queue_requests WHEN new.status = 'running'"
    " BEGIN INSERT INTO mark_log (seq) VALUES (new.seq); END",
]


async def test_requests_that_finish_quickly_are_never_marked_running(make_host: Any, ksi_db_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MARK_DELAY_S", 10.0)
    config = {"queue": {"concurrency": 2}}
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p1")), config=config) as host:
        await host.db.migrate("test-marks", ["; ".join(LOG_MARKS)])

        async def agent(s: int) -> list[Any]:  # more agents than slots: requests start while others are stored
            return [await host.complete(req(f"r{s}-{i}", f"s{s}")) for i in range(5)]

        results = [r for rs in await asyncio.gather(*map(agent, range(8))) for r in rs]
    assert all(r.ok for r in results)
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM ksi_queue_requests WHERE status = 'ok'") == [(40,)]
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM mark_log") == [(0,)]


async def test_a_request_still_running_after_the_delay_is_marked_running(make_host: Any, ksi_db_path: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MARK_DELAY_S", 0.0)
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        ticket = await host.submit(req("slow", "s1"))
        await gate.wait_calls(1)
        for _ in range(200):  # the mark is written by the queue's writer, not awaited by anyone
            if status_of(ksi_db_path, "slow") == "running":
                break
            await asyncio.sleep(0.01)
        assert status_of(ksi_db_path, "slow") == "running"
        gate.release_all()
        assert (await ticket.result()).ok
    assert status_of(ksi_db_path, "slow") == "ok"


async def test_stopping_writes_the_marks_of_running_requests_at_once(make_host: Any, ksi_db_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MARK_DELAY_S", 10.0)
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        await host.submit(req("r1", "s1"))
        await gate.wait_calls(1)
        assert status_of(ksi_db_path, "r1") == "queued"  # not due for 10 s
    assert status_of(ksi_db_path, "r1") == "running"  # written by the shutdown's drain


async def test_running_marks_a_full_disk_loses_are_one_warning_not_a_traceback(
        make_host: Any, ksi_db_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Lost marks change nothing (a restart runs queued and running rows alike); a database fault is an expected
    failure: one line in the log, nothing for the event loop's exception handler (which prints a traceback)."""
    from ksi_queue import schema

    from ksi_host.errors import DatabaseError

    monkeypatch.setattr(store, "MARK_DELAY_S", 0.0)
    loop = asyncio.get_running_loop()
    handled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: handled.append(context))
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        real = host.db.write_batch

        def full_for_marks(statements: Any, **kw: Any) -> Any:
            if all(sql == schema.MARK_RUNNING for sql, _ in statements):
                failed = loop.create_future()
                failed.set_exception(DatabaseError(str(ksi_db_path), "database or disk is full"))
                return failed
            return real(statements, **kw)

        monkeypatch.setattr(host.db, "write_batch", full_for_marks)
        ticket = await host.submit(req("slow", "s1"))
        await gate.wait_calls(1)
        for _ in range(200):
            if "running marks" in caplog.text:
                break
            await asyncio.sleep(0.01)
        gate.release_all()
        assert (await ticket.result()).ok
    loop.set_exception_handler(None)
    assert handled == []
    assert f"could not store the running marks of 1 request(s): database {ksi_db_path}: database or disk is full" in \
        caplog.text
    assert status_of(ksi_db_path, "slow") == "ok"
