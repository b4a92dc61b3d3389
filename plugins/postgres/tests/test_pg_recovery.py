"""What a host does about work and calls other hosts left behind, and about deadlock victims."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from conftest import pg_config
from ksi_postgres.db import Pg
from ksi_postgres.plugin import Plugin
from pg_helpers import Gate, rows, until

from ksi_host.errors import DatabaseError
from ksi_host.testing import FakeProvider, ScriptedProviders


async def test_a_stopping_host_gives_back_every_lease_it_holds_even_one_it_never_heard_of(make_host, pg_env) -> None:
    plugin = Plugin()
    async with make_host(plugin, ScriptedProviders(FakeProvider("a", script=[Gate()])), config=pg_config(concurrency=1)) as host:
        await host.submit({"model": "m", "prompt": "x", "request_id": "lost-answer", "session_id": "s"})
        await until(lambda: plugin.queue.running, what="it to run")
        plugin.queue.draining = True  # claims nothing more: the next claim below is "lost" on its way back
        await host.submit({"model": "m", "prompt": "y", "request_id": "other", "session_id": "t"})
        me = plugin.queue.host_id
        await rows(pg_env, "UPDATE ksi_pg_requests SET status = 'running', lease_owner = $1, lease_epoch = 1,"
                           " lease_expires_at = ksi_pg_now() + 60 WHERE request_id = 'other'", me)
    left = await rows(pg_env, "SELECT request_id, status, lease_owner FROM ksi_pg_requests ORDER BY seq")
    assert [(r["request_id"], r["status"], r["lease_owner"]) for r in left] == [("lost-answer", "queued", None),
                                                                               ("other", "queued", None)]


async def test_calls_left_sent_by_a_host_whose_heartbeat_stopped_become_unknown(make_host, pg_env) -> None:
    async with make_host(Plugin(), config=pg_config(), serve=False):
        pass  # (migrated)
    await rows(pg_env, "INSERT INTO ksi_pg_hosts (host_id, hostname, pid, started_at, heartbeat_at, lease_s, concurrency)"
                       " VALUES ('gone', 'elsewhere', 1, 0, ksi_pg_now() - 100, 30, 4),"
                       " ('fresh', 'elsewhere', 2, 0, ksi_pg_now(), 30, 4)")
    for call, host in (("c1", "gone"), ("c2", "fresh")):
        await rows(pg_env, "INSERT INTO ksi_pg_token_usage (call_id, host_id, request_id, attempt, model, provider, outcome,"
                           " created_at) VALUES ($1, $2, 'r', 1, 'm', 'p', 'sent', 0)", call, host)
    async with make_host(Plugin(), config=pg_config()):
        pass
    found = await rows(pg_env, "SELECT call_id, outcome FROM ksi_pg_token_usage ORDER BY call_id")
    assert [(r["call_id"], r["outcome"]) for r in found] == [("c1", "unknown"), ("c2", "sent")]


async def test_a_transaction_chosen_as_a_deadlock_victim_is_tried_again(pg_env, monkeypatch) -> None:
    pg = await Pg(pg_env).open()
    try:
        tries = []

        async def work(con):
            tries.append(1)
            if len(tries) == 1:
                raise asyncpg.DeadlockDetectedError("deadlock detected")
            return await con.fetchval("SELECT 42")

        assert await pg.transaction(work) == 42 and len(tries) == 2

        async def always(con):
            raise asyncpg.DeadlockDetectedError("deadlock detected")

        with pytest.raises(DatabaseError, match="deadlock"):
            await pg.transaction(always)
    finally:
        await pg.close()
    await asyncio.sleep(0)
