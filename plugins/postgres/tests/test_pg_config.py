"""Configuration: unconfigured it changes nothing; configured it takes the queue and ledger hooks over."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from conftest import ENV, pg_config
from ksi_postgres import schema
from ksi_postgres.plugin import CLAIMED_HOOKS, Plugin
from pg_helpers import rows

import ksi_host
from ksi_host.errors import DatabaseStartupError, StartupError
from ksi_host.models import ProviderResponse
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


class OtherQueue:
    """A stand-in for ksi-queue / ksi-tokens: records whether it was started and used."""

    def __init__(self) -> None:
        self.started = False
        self.enqueued = 0

    @ksi_host.hookimpl
    def ksi_startup(self, host: Any) -> None:
        self.started = True

    @ksi_host.hookimpl
    def ksi_enqueue(self, host: Any, request: Any) -> Any:
        self.enqueued += 1
        return DirectQueue().ksi_enqueue(host, request)

    @ksi_host.hookimpl
    def ksi_usage_report(self, host: Any, by: str, since: Any) -> list[dict[str, Any]]:
        return [{"key": "other"}]


async def test_unconfigured_it_answers_nothing(make_host) -> None:
    other = OtherQueue()
    async with make_host(Plugin(), other, ScriptedProviders(FakeProvider("a"))) as host:
        result = await host.complete({"model": "m", "prompt": "hi"})
        assert result.ok and other.started and other.enqueued == 1
        assert await host.usage_report() == [{"key": "other"}]
        assert "hosts" not in await host.status()


async def test_unconfigured_and_alone_it_says_what_is_missing(make_host) -> None:
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a"))) as host:
        with pytest.raises(ksi_host.MissingPluginError, match="ksi-queue"):
            await host.submit({"model": "m", "prompt": "hi"})


async def test_configured_it_takes_the_hooks_over_and_the_other_queue_is_not_started(make_host, pg_env) -> None:
    other = OtherQueue()
    async with make_host(Plugin(), other, ScriptedProviders(FakeProvider("a")), config=pg_config()) as host:
        result = await host.complete({"model": "m", "prompt": "hi", "request_id": "r1"})
        assert result.ok and not other.started and other.enqueued == 0
        assert [r["key"] for r in await host.usage_report()] == ["m"]
        for hook in CLAIMED_HOOKS:
            assert [i.plugin for i in host.hooks.impls(hook)] == ["Plugin"], hook
    stored = await rows(pg_env, "SELECT status FROM ksi_pg_requests WHERE request_id = 'r1'")
    assert [r["status"] for r in stored] == ["ok"]


async def test_an_unset_dsn_variable_stops_the_start_naming_it(make_host, monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(StartupError, match=f"postgres.dsn_env: the environment variable {ENV} is not set"):
        async with make_host(Plugin(), config=pg_config()):
            pass


@pytest.mark.parametrize("dsn", [
    "postgresql://ksi:s3cret-pw@/nodb?host={tmp}&port=1",
    "postgresql://ksi:s3cret@pw@/nodb?host={tmp}&port=1",  # an '@' in the password, not percent-encoded
    "postgresql://ksi:s3cret-pw@127.0.0.1:99999/nodb",      # a port out of range (asyncpg: OverflowError)
    "host={tmp} port=1 user=ksi password=s3cret-pw",        # key=value pairs (not what asyncpg reads)
])
async def test_an_unreachable_database_is_a_start_up_error_without_the_password(make_host, monkeypatch, tmp_path, dsn) -> None:
    monkeypatch.setenv(ENV, dsn.format(tmp=tmp_path))
    with pytest.raises(DatabaseStartupError) as caught:
        async with make_host(Plugin(), config=pg_config()):
            pass
    assert "s3cret" not in str(caught.value) and "pw@" not in str(caught.value) and "***" in str(caught.value)


def test_a_dsn_that_is_not_a_url_is_not_printed() -> None:
    from ksi_postgres.db import describe

    assert "s3cret" not in describe("s3cret-pw")  # the password alone in the variable


@pytest.mark.parametrize(("key", "value"), [("lease_s", 0.0), ("lease_s", float("nan")), ("concurrency", 0),
                                            ("dsn_env", "not a name"), ("model_limits", {"m": 0})])
async def test_bad_values_are_refused_naming_the_key(make_host, key, value) -> None:
    with pytest.raises(StartupError, match=key):
        async with make_host(Plugin(), config=pg_config(**{key: value})):
            pass


async def test_migrations_apply_once_and_a_newer_database_is_refused(make_host, pg_env) -> None:
    for _ in range(2):
        async with make_host(Plugin(), config=pg_config(), serve=False):
            pass
    versions = await rows(pg_env, "SELECT owner, version FROM ksi_pg_schema_versions")
    assert [(r["owner"], r["version"]) for r in versions] == [(schema.OWNER, len(schema.MIGRATIONS))]
    await rows(pg_env, "UPDATE ksi_pg_schema_versions SET version = 99")
    with pytest.raises(DatabaseStartupError, match="version 99, newer than this code knows"):
        async with make_host(Plugin(), config=pg_config()):
            pass


async def test_a_database_of_migration_2_gets_the_log_probabilities_column_and_keeps_its_results(make_host, pg_env) -> None:
    con = await asyncpg.connect(pg_env)
    try:  # as the ksi-postgres of migration 2 left it, with a stored result
        await con.execute("CREATE TABLE ksi_pg_schema_versions (owner text PRIMARY KEY, version integer NOT NULL)")
        for migration in schema.MIGRATIONS[:2]:
            await con.execute(migration)
        await con.execute("INSERT INTO ksi_pg_schema_versions VALUES ($1, 2)", schema.OWNER)
        await con.execute("INSERT INTO ksi_pg_requests (request_id, model, priority, rank, request_hash, status, created_at,"
                          " head, result_text) VALUES ('old', 'm', 'normal', 2, 'h', 'ok', 1.0, false, 'before')")
    finally:
        await con.close()
    probs = {"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": []}], "refusal": None}
    provider = FakeProvider("a", script=[ProviderResponse("hi", logprobs=probs)])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config()) as host:
        new = await host.complete({"model": "m", "prompt": "hi", "request_id": "new", "logprobs": True})
    async with make_host(Plugin(), config=pg_config()) as host:
        again = await host.complete({"model": "m", "prompt": "hi", "request_id": "new", "logprobs": True})
    assert new.logprobs == probs and again == new  # written by the newest ksi_pg_store, read back
    old = await rows(pg_env, "SELECT result_text, result_logprobs FROM ksi_pg_requests WHERE request_id = 'old'")
    assert [tuple(r) for r in old] == [("before", None)]
    versions = await rows(pg_env, "SELECT version FROM ksi_pg_schema_versions")
    assert [r["version"] for r in versions] == [len(schema.MIGRATIONS)]


async def test_a_database_of_migration_3_gets_the_system_fingerprint_column_and_keeps_its_results(make_host,
                                                                                              pg_env) -> None:
    probs = {"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": []}], "refusal": None}
    con = await asyncpg.connect(pg_env)
    try:  # as the ksi-postgres of migration 3 left it, with a stored result (its log probabilities too)
        await con.execute("CREATE TABLE ksi_pg_schema_versions (owner text PRIMARY KEY, version integer NOT NULL)")
        for migration in schema.MIGRATIONS[:3]:
            await con.execute(migration)
        await con.execute("INSERT INTO ksi_pg_schema_versions VALUES ($1, 3)", schema.OWNER)
        await con.execute("INSERT INTO ksi_pg_requests (request_id, model, priority, rank, request_hash, status, created_at,"
                          " head, result_text, result_logprobs) VALUES ('old', 'm', 'normal', 2, 'h', 'ok', 1.0, false,"
                          " 'before', $1)", json.dumps(probs))
    finally:
        await con.close()
    provider = FakeProvider("a", script=[ProviderResponse("hi", system_fingerprint="fp_new")])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config()) as host:
        new = await host.complete({"model": "m", "prompt": "hi", "request_id": "new", "seed": 7})
    async with make_host(Plugin(), config=pg_config()) as host:  # no provider: only the database can answer
        again = await host.complete({"model": "m", "prompt": "hi", "request_id": "new", "seed": 7})
    assert new.system_fingerprint == "fp_new" and again == new  # written by migration 4's ksi_pg_store, read back
    old = await rows(pg_env, "SELECT result_text, result_logprobs, system_fingerprint FROM ksi_pg_requests"
                             " WHERE request_id = 'old'")
    assert [(r[0], json.loads(r[1]), r[2]) for r in old] == [("before", probs, None)]
    versions = await rows(pg_env, "SELECT version FROM ksi_pg_schema_versions")
    assert [r["version"] for r in versions] == [len(schema.MIGRATIONS)] == [4]


def test_every_chat_parameter_has_a_column() -> None:
    from ksi_host.chat import PARAMETERS

    assert set(schema.PARAMETER_TYPES) == set(PARAMETERS)


async def test_a_host_that_serves_only_its_own_requests_is_refused_at_start(make_host) -> None:
    """``Host(resume=False)`` (``ksi-host ask``): a shared queue cannot leave other hosts' requests unstarted."""
    with pytest.raises(StartupError, match=r"ksi-postgres: a host that serves only its own requests .* cannot serve a "
                                           r"shared queue"):
        async with make_host(Plugin(), config=pg_config(), resume=False):
            pass
