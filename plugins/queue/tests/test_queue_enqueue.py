"""ksi_enqueue through a Host: tickets, durability, idempotency, results stored in columns, config."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ksi_queue import Plugin
from queue_helpers import GatedProvider, req, rows, settle, status_of, stored_only

from ksi_host import CompletionRequest, Database
from ksi_host.errors import ConfigError, ProviderUnavailable
from ksi_host.models import CompletionResult, Ticket
from ksi_host.testing import FakeProvider, ScriptedProviders


async def test_submit_runs_the_request_and_stores_its_result_in_columns(make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1")
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        ticket = await host.submit(req("r1", "s1", agent_id="a1", purpose="test", max_tokens=7, temperature=0.5))
        assert isinstance(ticket, Ticket)
        result = await ticket.result()
    assert result.ok and result.text == "ok" and result.provider == "p1" and result.session_id == "s1"
    stored = rows(ksi_db_path, "SELECT status, result_text, result_provider, result_session_id, prompt_tokens, completion_tokens,"
                  " total_tokens, cost_usd, error_type, agent_id, purpose, max_tokens, temperature, finished_at,"
                  " messages_json, metadata_json FROM ksi_queue_requests JOIN ksi_queue_payloads USING (seq)"
                  " WHERE request_id = 'r1'")
    assert stored == [("ok", "ok", "p1", "s1", 10, 5, 15, None, None, "a1", "test", 7, 0.5, result.finished_at,
                       '[{"role":"user","content":"hi"}]', "{}")]
    assert rows(ksi_db_path, "SELECT request_id, number, provider, error_type FROM ksi_queue_attempts") == [("r1", 1, "p1", None)]


async def test_the_request_is_durable_before_submit_returns(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        ticket = await host.submit(req("durable-1", "s1"))
        async with Database(ksi_db_path) as other:  # a second connection: only committed rows are visible
            row = await other.fetchone("SELECT request_id, session_id, model, status FROM ksi_queue_requests")
        assert tuple(row) == ("durable-1", "s1", "m", "queued") or tuple(row) == ("durable-1", "s1", "m", "running")
        gate.release_all()
        await ticket.result()


async def test_many_concurrent_submits_share_commits(make_host: Any, ksi_db_path: Any) -> None:
    import asyncio

    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p1"))) as host:
        before = host.db.commits
        results = await asyncio.gather(*(host.complete(req(f"r{i}", f"s{i % 7}")) for i in range(200)))
        commits = host.db.commits - before
    assert all(r.ok for r in results)
    assert commits < 100  # 200 inserts and 200 results did not take 400 transactions
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM ksi_queue_requests WHERE status = 'ok'") == [(200,)]


async def test_a_stored_result_is_returned_and_never_sent_again(make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1", script=[ProviderUnavailable("503"), "second"])
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        first = await host.complete(req("idem", "s1"))
    assert first.status == "error" and first.error["type"] == "ProviderUnavailable"
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:  # a new process on the same database
        ticket = await host.submit(req("idem", "s1"))
        assert ticket.is_done()
        again = await ticket.result()
    assert again == first  # every field, attempts and usage included
    assert len(provider.calls) == 1


async def test_resubmitting_a_queued_request_joins_its_run(make_host: Any, ksi_db_path: Any) -> None:
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate)) as host:
        t1 = await host.submit(req("same", "s1"))
        t2 = await host.submit(req("same", "s1"))
        await gate.wait_calls(1)
        gate.release_all()
        r1, r2 = await t1.result(), await t2.result()
    assert r1 == r2 and gate.calls == ["same"]
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM ksi_queue_requests") == [(1,)]


async def test_concurrent_first_submits_of_one_id_run_once(make_host: Any, ksi_db_path: Any) -> None:
    import asyncio

    provider = FakeProvider("p1")
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        results = await asyncio.gather(*(host.complete(req("twin", "s1")) for _ in range(5)))
    assert len({r.finished_at for r in results}) == 1 and len(provider.calls) == 1


async def test_error_results_keep_their_attempts(make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1", script=[ProviderUnavailable("down")])
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        result = await host.complete(req("e1"))
    assert result.status == "error"
    assert rows(ksi_db_path, "SELECT status, error_type, error_message FROM ksi_queue_requests") == [
        ("error", "ProviderUnavailable", f"down (not retried: {result.error['message'].split('(not retried: ')[1]}")]
    assert "no plugin implements ksi_handle_failure: install ksi-retry: pip install -e " in result.error["message"]
    assert rows(ksi_db_path, "SELECT number, provider, error_type FROM ksi_queue_attempts") == [(1, "p1", "ProviderUnavailable")]


async def test_a_request_that_json_cannot_hold_is_refused(make_host: Any) -> None:
    from ksi_host.errors import ValidationError

    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p1"))) as host:
        with pytest.raises(ValidationError, match="messages"):
            await host.submit(req("bad").__class__(model="m", messages=[{"role": "user", "content": [object()]}]))


@pytest.mark.parametrize(("table", "match"), [
    ({"concurrency": 0}, "concurrency must be a positive integer"),
    ({"concurrency": "8"}, "expected an integer"),
    ({"model_limits": {"gpt-4o": 0}}, "model_limits.gpt-4o must be a positive integer"),
    ({"burst": 3}, "unknown key"),
])
async def test_config_is_validated(make_host: Any, table: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        async with make_host(Plugin(), config={"queue": table}):
            pass


async def test_host_concurrency_overrides_the_queue_table(make_host: Any) -> None:
    async with make_host(Plugin(), config={"queue": {"concurrency": 3}, "host": {"concurrency": 5}}) as host:
        assert (await host.status())["queue"]["concurrency"] == 5
    async with make_host(Plugin(), config={"queue": {"concurrency": 3}}) as host:
        assert (await host.status())["queue"]["concurrency"] == 3


async def test_serve_false_stores_but_does_not_run(make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1")
    stored_only(ksi_db_path)
    async with make_host(Plugin(), ScriptedProviders(provider), serve=False) as host:
        ticket = await host.submit(req("later", "s1"))
        await settle()
        assert not ticket.is_done() and provider.calls == []
    assert status_of(ksi_db_path, "later") == "queued"
    with pytest.raises(Exception, match="host stopped"):
        await ticket.result()
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:  # the next serving host runs it
        result = await host.complete(req("later", "s1"))
    assert result.ok and len(provider.calls) == 1
    assert isinstance(result, CompletionResult)


async def test_ids_another_writer_stored_meanwhile_are_answered_from_the_table_and_the_batch_goes_on(
        make_host: Any, ksi_db_path: Any) -> None:
    """Accepting inserts with ON CONFLICT DO NOTHING and counts: rows a reading process stored while this
    one serves (a final one, an unfinished one) are found, the others of the same batch are accepted."""
    import asyncio
    import sqlite3

    provider = FakeProvider("p1")
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        await host.complete(req("warm"))
        other = sqlite3.connect(ksi_db_path, isolation_level=None)  # another process's writes
        now = 1_700_000_000.0
        for seq, rid in ((900, "done-elsewhere"), (901, "queued-elsewhere")):
            # (no request hash, as in rows stored before migration 3: their messages differ from req(rid)'s, and pass)
            other.execute("INSERT INTO ksi_queue_requests (seq, request_id, model, priority, status, created_at)"
                          " VALUES (?, ?, 'm', 'normal', 'queued', ?)", (seq, rid, now))
            other.execute("INSERT INTO ksi_queue_payloads (seq, messages_json, metadata_json) VALUES (?, ?, '{}')",
                          (seq, '[{"role":"user","content":"from elsewhere"}]'))
        other.execute("UPDATE ksi_queue_requests SET status = 'ok', started_at = ?, finished_at = ?, result_text = ?,"
                      " result_model = 'm', result_provider = 'p0', prompt_tokens = 1, completion_tokens = 1,"
                      " total_tokens = 2 WHERE seq = 900", (now, now, "answered elsewhere"))
        other.close()
        done, queued, fresh = await asyncio.gather(*(host.complete(req(rid)) for rid in
                                                     ("done-elsewhere", "queued-elsewhere", "fresh")))
    assert (done.text, done.provider) == ("answered elsewhere", "p0")
    assert queued.ok and fresh.ok
    assert [r.request_id for r in provider.calls] == ["warm", "queued-elsewhere", "fresh"] or \
        [r.request_id for r in provider.calls] == ["warm", "fresh", "queued-elsewhere"]
    assert rows(ksi_db_path, "SELECT request_id, status FROM ksi_queue_requests WHERE request_id LIKE '%elsewhere'"
                " ORDER BY seq") == [("done-elsewhere", "ok"), ("queued-elsewhere", "ok")]
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM ksi_queue_requests") == [(4,)]


async def test_a_deep_queue_keeps_only_the_rows_of_requests_behind_their_heads_and_runs_them_as_submitted(
        make_host: Any, monkeypatch: Any) -> None:
    from ksi_queue import plugin as queue_plugin

    monkeypatch.setattr(queue_plugin, "HELD_IN_MEMORY", 3)
    gate = asyncio.Event()

    async def held(request: Any) -> str:
        await gate.wait()
        return "ok"

    provider = FakeProvider("p1", script=[held])
    submitted = [CompletionRequest.from_dict({"model": "m", "prompt": f"q{i}", "session_id": "s1", "request_id": f"d{i}",
                                              "temperature": 0.5, "tools": [{"type": "function", "function": {"name": "f"}}]})
                 for i in range(8)]
    queue = Plugin()
    async with make_host(queue, ScriptedProviders(provider)) as host:
        tickets = [await host.submit(r) for r in submitted]
        in_memory = [queue.entries[r.request_id].request is not None for r in submitted]
        assert in_memory[:3] == [True] * 3 and in_memory[3:] == [False] * 5  # beyond 3 held, those behind the head do not
        gate.set()
        results = [await t.result() for t in tickets]
    assert all(r.ok for r in results)
    assert provider.calls == submitted  # loaded from their rows when their turn came: every field as submitted
