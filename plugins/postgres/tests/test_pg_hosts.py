"""Several hosts on one database (two Hosts in this process; tests/integration runs real processes)."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import pg_config
from ksi_postgres.plugin import Plugin
from pg_helpers import Gate, answered, rows, until

from ksi_host.testing import FakeProvider, ScriptedProviders


def freeze(plugin: Plugin) -> None:
    """Make a host stop claiming and renewing (as a host whose machine is cut off): its runs go on."""
    assert plugin.queue is not None
    plugin.queue.serving = False
    for task in plugin.queue._tasks:
        task.cancel()


async def test_a_request_submitted_on_one_host_runs_on_another_and_its_ticket_completes(make_host, pg_env, tmp_path) -> None:
    gate = Gate()
    busy = FakeProvider("a", script=[gate])
    free = FakeProvider("b", script=[answered])
    async with make_host(Plugin(), ScriptedProviders(busy), config=pg_config(concurrency=1), db_path=tmp_path / "a.db") as a:
        blocker = await a.submit({"model": "m", "prompt": "block", "request_id": "block"})
        await until(lambda: gate.arrived, what="host a to be busy")
        async with make_host(Plugin(), ScriptedProviders(free), config=pg_config(), db_path=tmp_path / "b.db"):
            result = await asyncio.wait_for(a.complete({"model": "m", "prompt": "x", "request_id": "x"}), 10)
            assert result.ok and result.provider == "b" and [c.request_id for c in free.calls] == ["x"]
        gate.open()
        assert (await blocker.result()).provider == "a"


async def test_two_hosts_submitting_the_same_ids_run_each_once(make_host, pg_env, tmp_path) -> None:
    calls: list[str] = []

    async def record(request: Any) -> Any:
        calls.append(request.request_id)
        await asyncio.sleep(0.005)
        return await answered(request)

    reqs = [{"model": "m", "prompt": f"q{i}", "request_id": f"same{i}", "session_id": f"s{i % 7}"} for i in range(120)]
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[record])), config=pg_config(),
                         db_path=tmp_path / "a.db") as a, \
            make_host(Plugin(), ScriptedProviders(FakeProvider("b", script=[record])), config=pg_config(),
                      db_path=tmp_path / "b.db") as b:
        ra, rb = await asyncio.gather(asyncio.gather(*[a.complete(r) for r in reqs]),
                                      asyncio.gather(*[b.complete(r) for r in reqs]))
    assert sorted(calls) == sorted(r["request_id"] for r in reqs)  # each exactly once
    assert ra == rb and all(r.ok for r in ra)
    stored = await rows(pg_env, "SELECT count(*) AS n FROM ksi_pg_requests WHERE status = 'ok'")
    assert stored[0]["n"] == 120


async def test_a_host_that_stops_renewing_loses_its_request_and_cannot_overwrite_the_result(make_host, pg_env, tmp_path) -> None:
    gate = Gate()
    plugin_a = Plugin()
    b_provider = FakeProvider("b", script=[answered])
    async with make_host(plugin_a, ScriptedProviders(FakeProvider("a", script=[gate])), config=pg_config(),
                         db_path=tmp_path / "a.db") as a:
        ticket = await a.submit({"model": "m", "prompt": "x", "request_id": "lease"})
        await until(lambda: gate.arrived, what="host a to run it")
        freeze(plugin_a)  # no more heartbeats: its lease (1 s) runs out
        async with make_host(Plugin(), ScriptedProviders(b_provider), config=pg_config(), db_path=tmp_path / "b.db"):
            await until(lambda: b_provider.calls, timeout=10, what="host b to take it over")
            final = await until_final(pg_env, "lease")
            assert final["result_provider"] == "b"
            a_calls = await rows(pg_env, "SELECT outcome FROM ksi_pg_token_usage WHERE provider = 'a'")
            assert [r["outcome"] for r in a_calls] == ["unknown"]  # its call was sent; nobody saw how it ended
            gate.open()  # host a's call ends now: its result must not replace b's
            result = await asyncio.wait_for(ticket.result(), 10)
        assert result.provider == "b"
    again = await rows(pg_env, "SELECT result_provider, lease_epoch FROM ksi_pg_requests WHERE request_id = 'lease'")
    assert again[0]["result_provider"] == "b" and again[0]["lease_epoch"] == 2
    attempts = await rows(pg_env, "SELECT provider FROM ksi_pg_attempts")
    assert [r["provider"] for r in attempts] == ["b"]


async def until_final(dsn: str, request_id: str) -> Any:
    found: list[Any] = []

    async def final() -> bool:
        found[:] = await rows(dsn, "SELECT * FROM ksi_pg_requests WHERE request_id = $1 AND status = 'ok'", request_id)
        return bool(found)

    await until(final, timeout=10, what=f"{request_id} to be final")
    return found[0]


async def test_a_stopping_host_gives_its_leases_back_at_once(make_host, pg_env, tmp_path) -> None:
    gate = Gate()
    b_provider = FakeProvider("b", script=[answered])
    async with make_host(Plugin(), ScriptedProviders(b_provider), config=pg_config(lease_s=60, concurrency=1),
                         db_path=tmp_path / "b.db") as b:
        blocker = Gate()
        b_provider.script = [blocker, answered]
        await b.submit({"model": "m", "prompt": "busy", "request_id": "busy"})
        await until(lambda: blocker.arrived, what="host b to be busy")
        async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[gate])),
                             config=pg_config(lease_s=60), db_path=tmp_path / "a.db") as a:
            await a.submit({"model": "m", "prompt": "x", "request_id": "handed"})
            await until(lambda: gate.arrived, what="host a to run it")
        blocker.open()  # b is free now; the lease of 60 s was given back when a stopped
        await until_final(pg_env, "handed")
    assert [c.request_id for c in b_provider.calls] == ["busy", "handed"]


async def test_status_on_any_host_shows_every_host(make_host, pg_env, tmp_path) -> None:
    plugin_a = Plugin()
    (tmp_path / "c.db").touch()  # (a host that does not serve opens an existing SQLite file, even when unused)
    async with make_host(plugin_a, ScriptedProviders(FakeProvider("a")), config=pg_config(), db_path=tmp_path / "a.db"):
        async with make_host(Plugin(), ScriptedProviders(FakeProvider("b")), config=pg_config(), db_path=tmp_path / "b.db"):
            async with make_host(Plugin(), config=pg_config(), serve=False, db_path=tmp_path / "c.db") as reader:
                hosts = (await reader.status())["hosts"]
                assert [h["state"] for h in hosts] == ["alive", "alive"] and not any(h["this"] for h in hosts)
                freeze(plugin_a)
                await asyncio.sleep(1.3)  # longer than its lease without a heartbeat
                assert [h["state"] for h in (await reader.status())["hosts"]] == ["lost", "alive"]
        async with make_host(Plugin(), config=pg_config(), serve=False, db_path=tmp_path / "c.db") as reader:
            assert [h["state"] for h in (await reader.status())["hosts"]] == ["lost", "stopped"]
