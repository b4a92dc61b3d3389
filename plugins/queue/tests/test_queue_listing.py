"""What the queue shows of its requests (issue 21): ``ksi_request_details`` (``ksi-host show``) and
``ksi_list_requests`` (``ksi-host logs``), from the tables, with the state a serving host knows from memory."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from ksi_queue import Plugin
from ksi_queue.listing import LIST_KEYS, list_sql
from queue_helpers import GatedProvider, req, rows, settle, status_of, stored_only

from ksi_host.errors import RateLimited
from ksi_host.models import RequestQuery, Usage, iso
from ksi_host.testing import FailOver, FakeProvider, ScriptedProviders


def ids(listed: list[dict[str, Any]]) -> list[str]:
    return [r["request_id"] for r in listed]


async def test_details_of_a_request_queued_running_and_final(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        running = await host.submit(req("r0", "s", agent_id="a", metadata={"k": 1}))
        await host.submit(req("r1", "s", max_tokens=9))
        await gate.wait_calls(1)
        run, queued = await host.request_details("r0"), await host.request_details("r1")
        assert status_of(ksi_db_path, "r0") == "queued"  # its running mark is not written yet: memory knows
        assert (run["state"], run["result"], run["request"]) == ("running", None, req("r0", "s", agent_id="a",
                                                                                       metadata={"k": 1}).to_dict())
        assert (queued["state"], queued["request"]["max_tokens"]) == ("queued", 9)
        assert await host.request_details("nobody") is None
        gate.release_all()
        result = await running.result()
        done = await host.request_details("r0")
    created = rows(ksi_db_path, "SELECT created_at FROM ksi_queue_requests WHERE request_id = 'r0'")[0][0]
    assert done == {"request": run["request"], "state": "ok", "submitted_at": iso(created), "result": result.to_dict()}
    assert done["result"]["attempts"] == [a.to_dict() for a in result.attempts] and len(result.attempts) == 1
    async with make_host(Plugin(), serve=False) as host:  # a reading host: the same, from the tables
        assert await host.request_details("r0") == done


async def test_the_list_is_newest_first_with_each_filter(make_host: Any, ksi_db_path: Any) -> None:
    flaky = FakeProvider("a", model="flaky", script=[RateLimited("slow down", retry_after=0.0)])
    steady = FakeProvider("b", usage=Usage(3, 2, 5, 0.5))
    fails = FakeProvider("c", model="broken", script=[ValueError("no")])
    async with make_host(Plugin(), ScriptedProviders(flaky, fails, steady), FailOver()) as host:
        for i in range(6):
            await host.complete(req(f"r{i}", f"s{i % 2}", agent_id=f"a{i % 3}", model="flaky" if i == 4 else "m"))
        everything = await host.list_requests(RequestQuery(limit=100))
        assert ids(everything) == [f"r{i}" for i in reversed(range(6))]
        assert all(tuple(r) == LIST_KEYS for r in everything)
        r4 = everything[1]
        assert (r4["status"], r4["attempts"], r4["total_tokens"], r4["cost_usd"], r4["model"]) == ("ok", 2, 5, 0.5, "flaky")
        assert r4["latency_ms"] > 0 and r4["submitted_at"].endswith("Z")
        assert ids(await host.list_requests()) == ids(everything)  # (20 at most by default)
        assert ids(await host.list_requests(RequestQuery(limit=2))) == ["r5", "r4"]
        assert ids(await host.list_requests(RequestQuery(session_id="s0"))) == ["r4", "r2", "r0"]
        assert ids(await host.list_requests(RequestQuery(agent_id="a1"))) == ["r4", "r1"]
        assert ids(await host.list_requests(RequestQuery(model="flaky"))) == ["r4"]
        assert ids(await host.list_requests(RequestQuery(session_id="s1", agent_id="a2"))) == ["r5"]
        since = rows(ksi_db_path, "SELECT created_at FROM ksi_queue_requests WHERE request_id = 'r3'")[0][0]
        assert ids(await host.list_requests(RequestQuery(since=since))) == ["r5", "r4", "r3"]
        assert ids(await host.list_requests(RequestQuery(since=since, session_id="s0"))) == ["r4"]
        ticket = await host.submit(req("cancel me", "s9"))
        await host.cancel("cancel me")
        await ticket.result()
        assert ids(await host.list_requests(RequestQuery(status="cancelled"))) == ["cancel me"]
        assert ids(await host.list_requests(RequestQuery(status="ok", limit=3))) == ["r5", "r4", "r3"]
        assert await host.list_requests(RequestQuery(status="error")) == []
        assert await host.list_requests(RequestQuery(session_id="nobody")) == []


async def test_a_serving_host_lists_what_runs_as_running_whatever_its_row_says_yet(make_host: Any,
                                                                                    ksi_db_path: Any) -> None:
    """Rows left 'running' by a process that is gone are queued again at the next serving start; a request
    that runs here is 'running' before its mark is written."""
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        for rid in ("old0", "old1", "old2"):
            await host.submit(req(rid))
    con = sqlite3.connect(ksi_db_path)
    con.execute("UPDATE ksi_queue_requests SET status = 'running'")  # as a process killed while running them left them
    con.commit()
    con.close()
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        await gate.wait_calls(1)
        assert [status_of(ksi_db_path, rid) for rid in ("old0", "old1", "old2")] == ["queued"] * 3
        await host.submit(req("new"))
        await settle()
        assert ids(await host.list_requests(RequestQuery(status="running"))) == ["old0"]
        assert ids(await host.list_requests(RequestQuery(status="queued"))) == ["new", "old2", "old1"]
        assert ids(await host.list_requests(RequestQuery(status="queued", limit=1))) == ["new"]
        assert [(r["request_id"], r["status"], r["latency_ms"]) for r in await host.list_requests()] == [
            ("new", "queued", None), ("old2", "queued", None), ("old1", "queued", None), ("old0", "running", None)]
        gate.release_all()


@pytest.mark.parametrize(("query", "index"), [
    (RequestQuery(), "created"), (RequestQuery(session_id="s"), "session"), (RequestQuery(agent_id="a"), "agent"),
    (RequestQuery(model="m"), "model"), (RequestQuery(status="ok"), "created"), (RequestQuery(status="error"), "failed"),
    (RequestQuery(status="cancelled", model="m", agent_id="a"), "failed"), (RequestQuery(status="queued"), "unfinished"),
    (RequestQuery(status="running", agent_id="a"), "unfinished"), (RequestQuery(since=1.0), "created"),
    (RequestQuery(since=1.0, session_id="s"), "session"),
    (RequestQuery(session_id="s", agent_id="a", model="m", status="error"), "session"),
])
async def test_every_listing_reads_one_index_from_its_newest_end(make_host: Any, ksi_db_path: Any, query: RequestQuery,
                                                                 index: str) -> None:
    """No full scan and no sort: a page costs about the same on a million rows (timed in benchmarks/logs_scale.py).
    The index read is the most selective one asked for: a session's, then the failed or unfinished rows'."""
    async with make_host(Plugin()):
        pass
    sql, params = list_sql(query, status=query.status, limit=query.limit)
    con = sqlite3.connect(ksi_db_path)
    plan = [row[-1] for row in con.execute("EXPLAIN QUERY PLAN " + sql, params)]
    con.close()
    assert plan[0].endswith(f" r USING INDEX ksi_queue_requests_{index}") or \
        f" r USING INDEX ksi_queue_requests_{index} (" in plan[0], plan
    assert not any("TEMP B-TREE" in step for step in plan), plan
