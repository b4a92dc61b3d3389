"""Restart on the same database: unfinished requests are restored in order; programming errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ksi_queue import Plugin
from queue_helpers import GatedProvider, req, rows, settle, status_of, stored_only

from ksi_host.errors import Cancelled, ValidationError
from ksi_host.testing import ScriptedProviders


async def test_unfinished_requests_run_again_after_a_restart_in_their_order(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    order = [("r0", "A"), ("r1", "B"), ("r2", "A"), ("r3", None), ("r4", "B"), ("r5", "A")]
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        tickets = [await host.submit(req(rid, sid, temperature=0.25, metadata={"k": 1})) for rid, sid in order]
        gate.release("r0")
        assert (await tickets[0].result()).ok
        await gate.wait_calls(2)  # r1 is running when the host stops
    with pytest.raises(Cancelled, match="host stopped"):
        await tickets[1].result()
    assert [status_of(ksi_db_path, rid) for rid, _ in order] == ["ok", "running", "queued", "queued", "queued", "queued"]

    again = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(again), config={"queue": {"concurrency": 1}}) as host:
        q = (await host.status())["queue"]
        assert q["queued"] + q["running"] == 5
        results = await asyncio.gather(*(host.complete(req(rid, sid, temperature=0.25)) for rid, sid in order))
    assert again.calls == ["r1", "r2", "r3", "r4", "r5"]  # r0's stored result was not sent again
    assert [r.status for r in results] == ["ok"] * 6
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM ksi_queue_requests") == [(6,)]


async def test_restored_requests_keep_their_fields_and_priority(make_host: Any, ksi_db_path: Any) -> None:
    seen: list[Any] = []
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        await host.submit(req("low", priority="low", agent_id="a1", purpose="p", max_tokens=9, temperature=0.5,
                              timeout_s=30.0, metadata={"x": "y", "n": 2}))
        await host.submit(req("critical", priority="critical"))
        await host.submit(req("plain"))
    gate = GatedProvider(open=True, on_call=seen.append)
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        # the same requests (what they ask: max_tokens and temperature too; who asks and how may differ)
        await asyncio.gather(host.complete(req("low", max_tokens=9, temperature=0.5)), host.complete(req("critical")),
                             host.complete(req("plain")))
    # restored at once with one free slot: the first runs, then priority decides
    assert gate.calls == ["low", "critical", "plain"] or gate.calls == ["critical", "plain", "low"]
    low = next(r for r in seen if r.request_id == "low")
    assert low == req("low", priority="low", agent_id="a1", purpose="p", max_tokens=9, temperature=0.5,
                      timeout_s=30.0, metadata={"x": "y", "n": 2})


async def test_a_programming_error_reaches_the_waiter_and_leaves_the_request_stored(make_host: Any,
                                                                                    ksi_db_path: Any) -> None:
    gate = GatedProvider(open=True)
    gate.fail["bug"] = ZeroDivisionError("a bug in a provider")
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        bug = await host.submit(req("bug", "A"))
        nxt = await host.submit(req("next", "A"))
        with pytest.raises(ZeroDivisionError, match="a bug in a provider"):
            await bug.result()
        assert (await nxt.result()).ok  # the session moves on; the broken request is not lost
        with pytest.raises(ZeroDivisionError):  # submitting it again in this process: the same error
            await (await host.submit(req("bug", "A"))).result()
    assert status_of(ksi_db_path, "bug") in ("queued", "running")
    fixed = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(fixed)) as host:
        assert (await host.complete(req("bug", "A"))).ok
    assert fixed.calls == ["bug"]


async def test_a_programming_error_with_nobody_waiting_goes_to_the_loop_handler(make_host: Any, ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        await host.submit(req("orphan"))
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    gate = GatedProvider(open=True)
    gate.fail["orphan"] = KeyError("boom")
    try:
        async with make_host(Plugin(), ScriptedProviders(gate)):
            await gate.wait_calls(1)
            await settle()
    finally:
        loop.set_exception_handler(None)
    assert len(reported) == 1 and isinstance(reported[0]["exception"], KeyError)
    assert "orphan" in reported[0]["message"]


async def test_a_restored_request_can_be_cancelled_before_it_runs(make_host: Any, ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        await host.submit(req("first", "A"))
        await host.submit(req("second", "A"))
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        await gate.wait_calls(1)
        assert await host.cancel("second") is True
        gate.release_all()
        assert (await host.complete(req("first", "A"))).ok
        assert (await host.complete(req("second", "A"))).status == "cancelled"
    assert gate.calls == ["first"]


async def test_a_cancelled_error_nobody_asked_for_is_a_programming_error(make_host: Any) -> None:
    gate = GatedProvider(open=True)
    gate.fail["odd"] = asyncio.CancelledError()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        odd = await host.submit(req("odd", "A"))
        nxt = await host.submit(req("next", "A"))
        with pytest.raises(RuntimeError, match="CancelledError without being cancelled"):
            await odd.result()
        assert (await nxt.result()).ok
        assert (await host.status())["queue"]["in_flight"] == 0  # no slot leaked


async def test_in_memory_databases_are_private_to_each_host(make_host: Any) -> None:
    from ksi_host.testing import FakeProvider

    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p")), db_path=":memory:") as a:
        async with make_host(Plugin(), ScriptedProviders(FakeProvider("p")), db_path=":memory:") as b:
            assert (await a.complete(req("x"))).ok and (await b.complete(req("x"))).ok


async def test_a_version_1_database_is_migrated_with_its_rows(make_host: Any, ksi_db_path: Any) -> None:
    """Migration 2 rebuilds ksi_queue_requests (its status CHECK): stored requests, payloads and
    attempts survive; queued ones run after it; final ones answer from the table."""
    import sqlite3

    from ksi_queue import schema

    from ksi_host import Database

    v1_insert = ("INSERT INTO ksi_queue_requests (seq, request_id, session_id, agent_id, originator_agent_id, purpose, model,"
                 " priority, max_tokens, temperature, timeout_s, status, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)")
    v1_payload = "INSERT INTO ksi_queue_payloads (seq, messages_json, metadata_json) VALUES (?, ?, ?)"
    v1_result = ("UPDATE ksi_queue_requests SET status = ?, started_at = ?, finished_at = ?, result_text = ?, result_model = ?,"
                 " result_provider = ?, result_session_id = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?,"
                 " cost_usd = ?, error_type = ?, error_message = ? WHERE seq = ?")
    v1_attempt = ("INSERT INTO ksi_queue_attempts (request_id, number, provider, error_type, error_message, delay_s,"
                  " latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?)")
    async with Database(ksi_db_path) as db:  # a database a version-1 ksi-queue left behind
        await db.migrate(schema.OWNER, schema.MIGRATIONS[:1])
        now = 1_700_000_000.0
        await db.write_batch([
            (v1_insert, (1, "done", "A", None, None, None, "m", "normal", None, None, None, now)),
            (v1_insert, (2, "waiting", "A", "ag", None, "p", "m", "high", 7, 0.5, None, now)),
            (v1_payload, (1, '[{"role":"user","content":"one"}]', "{}")),
            (v1_payload, (2, '[{"role":"user","content":"two"}]', '{"k":1}')),
            (v1_result, ("ok", now, now + 1, "stored answer", "m", "p1", "A", 1, 2, 3, None, None, None, 1)),
            (v1_attempt, ("done", 1, "p1", None, None, None, 12.5)),
        ])
    gate = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        done, waiting = await asyncio.gather(host.complete(req("done", "A")), host.complete(req("waiting", "A")))
    assert gate.calls == ["waiting"]  # the final one is not sent again
    assert (done.text, done.usage.total_tokens, [(a.provider, a.latency_ms) for a in done.attempts]) == (
        "stored answer", 3, [("p1", 12.5)])
    assert waiting.ok
    con = sqlite3.connect(ksi_db_path)
    assert con.execute("SELECT version FROM ksi_schema_versions WHERE owner = ?", (schema.OWNER,)).fetchone() == (
        len(schema.MIGRATIONS),)
    # rows stored before migration 3 have no request hash: "done" and "waiting" were accepted although
    # req()'s messages differ from the ones stored
    assert con.execute("SELECT COUNT(*) FROM ksi_queue_requests WHERE request_hash IS NULL").fetchone() == (2,)
    table_sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'ksi_queue_requests'").fetchone()[0]
    assert "status = 'queued' OR" in table_sql and " IN (" not in table_sql
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'ksi_queue_requests_unfinished'").fetchone()
    assert con.execute("SELECT agent_id, purpose, priority, max_tokens FROM ksi_queue_requests WHERE seq = 2"
                       ).fetchone() == ("ag", "p", "high", 7)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # the rule itself is unchanged
        con.execute("UPDATE ksi_queue_requests SET status = 'lost' WHERE seq = 1")
    con.close()



async def test_a_version_5_database_gets_the_system_fingerprint_column_and_keeps_its_results(make_host: Any,
                                                                                           ksi_db_path: Any) -> None:
    from ksi_queue import schema

    from ksi_host import Database
    from ksi_host.models import ProviderResponse
    from ksi_host.testing import FakeProvider

    async with Database(ksi_db_path) as db:  # a database the ksi-queue of migration 5 left, with a stored answer
        await db.migrate(schema.OWNER, schema.MIGRATIONS[:5])
        await db.write_batch([
            ("INSERT INTO ksi_queue_requests (seq, request_id, model, priority, status, created_at, started_at,"
             " finished_at, result_text, result_model, result_provider, prompt_tokens, completion_tokens, total_tokens)"
             " VALUES (1, 'old', 'm', 'normal', 'ok', 1.0, 1.0, 2.0, 'before', 'm', 'p', 1, 1, 2)", ()),
            ("INSERT INTO ksi_queue_payloads (seq, messages_json, metadata_json) VALUES (1, '[]', '{}')", ()),
        ])
    provider = FakeProvider("p", script=[ProviderResponse("new", system_fingerprint="fp_new")])
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        old, new = await host.complete(req("old")), await host.complete(req("new"))
    async with make_host(Plugin()) as host:  # no provider: the table answers both
        assert [await host.complete(req("old")), await host.complete(req("new"))] == [old, new]
    assert (old.text, old.system_fingerprint) == ("before", None) and new.system_fingerprint == "fp_new"
    assert rows(ksi_db_path, "SELECT request_id, result_text, system_fingerprint FROM ksi_queue_requests ORDER BY seq") == [
        ("old", "before", None), ("new", "new", "fp_new")]
    assert rows(ksi_db_path, "SELECT version FROM ksi_schema_versions WHERE owner = ?", (schema.OWNER,)) == [
        (len(schema.MIGRATIONS),)] == [(6,)]

async def test_a_host_that_does_not_resume_runs_only_what_is_submitted_to_it(make_host: Any, ksi_db_path: Any) -> None:
    """``Host(resume=False)`` (``ksi-host ask``): the requests an earlier run left stored are not started and take
    no slot; a request behind one of them in its session is refused (it could never start), and not stored."""
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        for rid, sid in [("old0", "A"), ("old1", "A"), ("old2", None)]:
            await host.submit(req(rid, sid))
    gate = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}, resume=False) as host:
        assert (await host.complete(req("mine"))).ok  # the one slot was free: nothing old took it
        assert (await host.complete(req("mine-B", "B"))).ok
        with pytest.raises(ValidationError, match="session_id: request mine-A cannot start: .* earlier run .* 'A'"):
            await host.submit(req("mine-A", "A"))
        assert (await host.status())["queue"]["queued"] == 3
    assert gate.calls == ["mine", "mine-B"]
    assert [status_of(ksi_db_path, rid) for rid in ("old0", "old1", "old2", "mine-A")] == ["queued"] * 3 + [None]

    again = GatedProvider(open=True)
    async with make_host(Plugin(), ScriptedProviders(again)) as host:  # the next host that resumes runs them
        await asyncio.gather(*(host.complete(req(rid, sid)) for rid, sid in [("old0", "A"), ("old1", "A"), ("old2", None)]))
    assert sorted(again.calls) == ["old0", "old1", "old2"]
