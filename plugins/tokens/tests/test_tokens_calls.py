"""Every call sent is a row before it is sent; calls whose ending nobody saw become ``unknown``."""

from __future__ import annotations

import asyncio
import logging
import time

from ksi_tokens.plugin import Plugin
from ksi_tokens.schema import MIGRATIONS, OWNER
from tokens_helpers import RetryPolicy, ledger, record, request, start

from ksi_host.db import Database
from ksi_host.errors import ProviderTimeout, RateLimited
from ksi_host.models import ProviderResponse, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


async def test_the_row_is_durable_before_the_call_is_sent(make_host, ksi_db_path):
    seen = []

    async def answer(req):
        # another connection (as after a kill) already finds the call, sent and not ended
        async with Database(ksi_db_path) as other:
            seen.extend(dict(r) for r in await other.fetchall("SELECT * FROM token_usage"))
        return ProviderResponse("ok", usage=Usage(3, 2, 5, None))

    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p", script=[answer]))) as host:
        req = request(agent_id="a1")
        await host.complete(req)
        (row,) = await ledger(host)
    (sent,) = seen
    assert (sent["request_id"], sent["attempt"], sent["provider"], sent["agent_id"]) == (req.request_id, 1, "p", "a1")
    assert sent["outcome"] == "sent"
    assert (sent["prompt_tokens"], sent["total_tokens"], sent["cost_usd"], sent["latency_ms"]) == (None,) * 4
    # the same row, completed by call_id when the call ended
    assert (row["id"], row["call_id"], row["created_at"]) == (sent["id"], sent["call_id"], sent["created_at"])
    assert (row["outcome"], row["total_tokens"]) == ("ok", 5) and row["latency_ms"] is not None


async def test_every_call_sent_is_one_row_whatever_it_reported(make_host):
    # a 429 without usage, a timeout without an answer (unknown: it may have been billed), then ok
    p = FakeProvider("p", script=[RateLimited("429"), ProviderTimeout("no answer in 30s"), "done"])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p), RetryPolicy()) as host:
        result = await host.complete(request())
        rows = await ledger(host)
        (total,) = await host.usage_report("total")
    assert result.ok
    assert [(r["attempt"], r["outcome"], r["total_tokens"]) for r in rows] == [
        (1, "RateLimited", None), (2, "unknown", None), (3, "ok", 15)]
    assert len(rows) == len(p.calls) == total["calls"] == 3
    assert (total["unknown_calls"], total["in_flight_calls"], total["total_tokens"]) == (1, 0, result.usage.total_tokens)


async def test_a_call_cut_short_by_a_cancel_is_recorded_as_unknown(make_host, ksi_db_path):
    called = asyncio.Event()

    async def hang(req):
        called.set()
        await asyncio.Event().wait()  # never answers

    queue = DirectQueue()
    async with make_host(Plugin(), queue, ScriptedProviders(FakeProvider("p", script=[hang]))) as host:
        ticket = await host.submit(request())
        await called.wait()
        (sent,) = await ledger(host)
        assert sent["outcome"] == "sent"
        for task in list(queue.tasks):
            task.cancel()  # the execute task, while its call is in flight
        await asyncio.gather(*queue.tasks, return_exceptions=True)
        assert ticket.future.cancelled() or ticket.future.done()
    # the host stopped after reporting the call cut short (it waits for those reports)
    async with Database(ksi_db_path) as db:
        (row,) = [dict(r) for r in await db.fetchall("SELECT * FROM token_usage")]
    assert row["call_id"] == sent["call_id"]
    assert row["outcome"] == "unknown" and row["total_tokens"] is None and row["latency_ms"] is not None


async def test_a_serving_start_turns_calls_left_sent_into_unknown_and_a_read_only_one_never_does(
        make_host, caplog):
    before = time.time() - 60
    lost, ended = request(model="m1"), request(model="m1")
    async with make_host(Plugin()) as host:  # a process that dies during two calls: one ended, one not
        await start(host, lost, created_at=before)
        call = await start(host, ended, created_at=before)
        await record(host, ended, usage=Usage(4, 4, 8, None), created_at=call.created_at, call_id=call.call_id)

    async with make_host(Plugin(), serve=False) as reader:  # ksi-host usage / status: the server may still run
        (total,) = await reader.usage_report("total")
        status = (await reader.status())["usage"]
        rows = await ledger(reader)
    assert (total["calls"], total["unknown_calls"], total["in_flight_calls"]) == (2, 1, 1)
    assert (status["calls"], status["unknown_calls"], status["in_flight_calls"]) == (2, 1, 1)
    assert [r["outcome"] for r in rows] == ["sent", "ok"]

    with caplog.at_level(logging.WARNING, logger="ksi_host"):
        async with make_host(Plugin()) as server:  # the next serving process
            (total,) = await server.usage_report("total")
            rows = await ledger(server)
    assert [r["outcome"] for r in rows] == ["unknown", "ok"]
    assert rows[0]["request_id"] == lost.request_id and rows[0]["total_tokens"] is None
    assert (total["calls"], total["unknown_calls"], total["in_flight_calls"], total["total_tokens"]) == (2, 1, 0, 8)
    assert "1 upstream call(s) sent by a process that stopped" in caplog.text


async def test_a_serving_start_leaves_calls_sent_after_it_alone(make_host):
    async with make_host(Plugin()) as host:
        await start(host, request(), created_at=time.time() + 3600)  # a later clock than this start's
    async with make_host(Plugin()) as host:
        rows = await ledger(host)
    assert [r["outcome"] for r in rows] == ["sent"]


async def test_a_call_taken_for_lost_gets_its_ending_if_its_process_lived(make_host, ksi_db_path):
    """A second serving start on a live process's database (the queue refuses it, but a plugin
    registered before the queue has run its start-up by then): the rows it wrongly made unknown
    get their true ending when the calls end."""
    req = request()
    async with make_host(Plugin()) as first:
        call = await start(first, req, created_at=time.time() - 1)
        async with make_host(Plugin()) as second:
            assert [r["outcome"] for r in await ledger(second)] == ["unknown"]
        await record(first, req, usage=Usage(2, 3, 5, 0.5), created_at=call.created_at, call_id=call.call_id)
        (row,) = await ledger(first)
    assert (row["outcome"], row["total_tokens"], row["cost_usd"]) == ("ok", 5, 0.5)


async def test_an_ending_without_a_recorded_start_is_still_a_row(make_host):
    async with make_host(Plugin()) as host:
        await record(host, request(), usage=None, outcome="ProviderUnavailable")
        rows = await ledger(host)
    assert [(r["outcome"], r["total_tokens"]) for r in rows] == [("ProviderUnavailable", None)]


async def test_rows_of_version_2_survive_the_migration(make_host, ksi_db_path):
    async with Database(ksi_db_path) as db:
        await db.migrate(OWNER, MIGRATIONS[:2])
        await db.execute(
            "INSERT INTO token_usage (request_id, attempt, session_id, agent_id, originator_agent_id, purpose, model,"
            " provider, prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms, outcome, created_at)"
            " VALUES ('r1', 1, 's1', 'a1', NULL, 'plan', 'm', 'p', 10, 5, 15, 0.25, 12.5, 'ok', 1700000000.0)")
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p"))) as host:
        await host.complete(request())
        rows = await ledger(host)
        (total,) = await host.usage_report("total")
        version = await host.db.schema_version(OWNER)
    assert version == len(MIGRATIONS)
    old, new = rows
    assert {k: old[k] for k in ("id", "call_id", "request_id", "session_id", "agent_id", "purpose", "total_tokens",
                                "cost_usd", "latency_ms", "outcome")} == {
        "id": 1, "call_id": None, "request_id": "r1", "session_id": "s1", "agent_id": "a1", "purpose": "plan",
        "total_tokens": 15, "cost_usd": 0.25, "latency_ms": 12.5, "outcome": "ok"}
    assert new["id"] == 2 and new["call_id"] is not None
    assert (total["calls"], total["total_tokens"]) == (2, 30)
