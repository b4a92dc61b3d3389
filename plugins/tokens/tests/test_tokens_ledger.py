"""The ledger: one durable row per upstream call, with the usage it reported."""

from __future__ import annotations

import asyncio
import random
from importlib.metadata import entry_points

from ksi_tokens.plugin import Plugin
from ksi_tokens.schema import INDEXES, MARK_UNKNOWN, MIGRATIONS
from tokens_helpers import RetryPolicy, ledger, request

import ksi_host
from ksi_host.db import Database
from ksi_host.errors import BadRequest, ProviderTimeout, ProviderUnavailable, RateLimited
from ksi_host.models import ProviderResponse, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


def cols(rows, *names):
    return [tuple(r[n] for n in names) for r in rows]


async def test_one_row_per_successful_call_with_every_column(make_host):
    p = FakeProvider("deploy-a", usage=Usage(11, 7, 18, 0.0042))
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        req = request(model="gpt-x", session_id="s1", agent_id="a1", originator_agent_id="o1", purpose="plan")
        result = await host.complete(req)
        assert result.ok
        (row,) = await ledger(host)
    assert row["request_id"] == req.request_id
    assert row["attempt"] == 1
    assert (row["session_id"], row["agent_id"], row["originator_agent_id"], row["purpose"]) == ("s1", "a1", "o1", "plan")
    assert (row["model"], row["provider"], row["outcome"]) == ("gpt-x", "deploy-a", "ok")
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (11, 7, 18)
    assert row["cost_usd"] == 0.0042
    assert row["latency_ms"] >= 0
    assert row["created_at"] > 1_600_000_000


async def test_optional_request_fields_and_unknown_cost_are_null(make_host):
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p1"))) as host:
        await host.complete(request())
        (row,) = await ledger(host)
    assert (row["session_id"], row["agent_id"], row["originator_agent_id"], row["purpose"], row["cost_usd"]) == (None,) * 5


async def test_every_failed_attempt_is_a_row_with_the_usage_it_reported_or_none(make_host):
    a = FakeProvider("a", script=[ProviderUnavailable("502", usage=Usage(3, 0, 3, 0.001))])
    b = FakeProvider("b", script=[RateLimited("429"), ProviderTimeout("slow", usage=Usage(4, 1, 5, None)), "done"],
                     usage=Usage(20, 10, 30, 0.01))
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(a, b), RetryPolicy()) as host:
        req = request()
        result = await host.complete(req)
        rows = await ledger(host)
    assert result.ok and result.provider == "b"
    assert [x.provider for x in result.attempts] == ["a", "b", "b", "b"]
    # attempt 2 (a 429 that reported no usage) is a row without tokens: NULL, not zero
    assert cols(rows, "request_id", "attempt", "provider", "outcome", "prompt_tokens", "total_tokens", "cost_usd") == [
        (req.request_id, 1, "a", "ProviderUnavailable", 3, 3, 0.001),
        (req.request_id, 2, "b", "RateLimited", None, None, None),
        (req.request_id, 3, "b", "ProviderTimeout", 4, 5, None),
        (req.request_id, 4, "b", "ok", 20, 30, 0.01),
    ]
    assert len(rows) == len(a.calls) + len(b.calls) == 4
    assert all(r["latency_ms"] is not None and r["call_id"] for r in rows)
    assert sum(r["total_tokens"] or 0 for r in rows) == result.usage.total_tokens == 38
    assert sum(r["prompt_tokens"] or 0 for r in rows) == result.usage.prompt_tokens
    assert sum(r["completion_tokens"] or 0 for r in rows) == result.usage.completion_tokens
    assert abs(sum(r["cost_usd"] or 0 for r in rows) - result.usage.cost_usd) < 1e-12


async def test_a_request_that_gives_up_keeps_the_usage_its_failed_calls_reported(make_host):
    p = FakeProvider("p", script=[BadRequest("no", usage=Usage(9, 0, 9, None))])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:  # no failure policy: final
        result = await host.complete(request())
        rows = await ledger(host)
    assert result.status == "error"
    assert cols(rows, "attempt", "outcome", "total_tokens") == [(1, "BadRequest", 9)]


def _script(rng: random.Random) -> tuple[list, list[Usage]]:
    """A random provider script and the usages it will report, in call order."""
    items, reported = [], []
    for _ in range(rng.randint(0, 3)):
        u = Usage(rng.randint(0, 50), rng.randint(0, 20), 0, rng.choice([None, 0.0005 * rng.randint(1, 9)]))
        u = Usage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens, u.cost_usd)
        kind = rng.choice([ProviderUnavailable, RateLimited, ProviderTimeout])
        if rng.random() < 0.6:
            items.append(kind("fail", usage=u))
            reported.append(u)
        else:
            items.append(kind("fail"))
    u = Usage(rng.randint(1, 500), rng.randint(1, 300), 0, rng.choice([None, 0.01]))
    u = Usage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens, u.cost_usd)
    items.append(ProviderResponse("ok", usage=u))
    reported.append(u)
    return items, reported


class PerRequest:
    """One FakeProvider per request (its own script), then a shared failover target."""

    def __init__(self):
        self.by_request = {}
        self.spare = FakeProvider("spare", usage=Usage(1, 1, 2, None))

    @ksi_host.hookimpl
    def ksi_select_provider(self, request, exclude):
        p = self.by_request[request.request_id]
        return p if p.name not in exclude else self.spare


async def test_totals_equal_what_providers_reported_under_retries_and_failover(make_host):
    rng = random.Random(7)
    scripts = [_script(rng) for _ in range(120)]

    sel = PerRequest()
    reqs, expected = [], {}
    for i, (items, reported) in enumerate(scripts):
        r = request(agent_id=f"agent{i % 4}", purpose=rng.choice(["a", "b"]))
        sel.by_request[r.request_id] = FakeProvider(f"p{i % 3}", script=items)
        reqs.append(r)
        expected[r.request_id] = reported
    async with make_host(Plugin(), DirectQueue(), sel, RetryPolicy(max_attempts=10)) as host:
        results = await asyncio.gather(*(host.complete(r) for r in reqs))
        rows = await ledger(host)
        by_agent = await host.usage_report("agent")
    assert all(r.ok for r in results)
    # the scripts exercised what the test is about: failover, same-provider retries, failed calls with usage
    assert any(a.provider == "spare" for r in results for a in r.attempts)
    assert any(len({a.provider for a in r.attempts}) == 1 and len(r.attempts) > 1 for r in results)
    assert any(r["outcome"] != "ok" for r in rows)
    # one row per call the providers received, whether or not it reported usage
    assert len(rows) == sum(len(p.calls) for p in sel.by_request.values()) + len(sel.spare.calls)
    assert any(r["total_tokens"] is None for r in rows)
    for res in results:
        mine = [r for r in rows if r["request_id"] == res.request_id]
        assert [r["attempt"] for r in mine] == list(range(1, len(res.attempts) + 1))
        reported = [r for r in mine if r["total_tokens"] is not None]
        # the spare answers after a ProviderUnavailable failover: its usage counts too
        expect = list(expected[res.request_id])
        if any(a.provider == "spare" for a in res.attempts):
            expect = expect[: len(reported) - 1] + [Usage(1, 1, 2, None)]
        assert [(r["prompt_tokens"], r["completion_tokens"], r["total_tokens"], r["cost_usd"]) for r in reported] == [
            (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost_usd) for u in expect
        ]
        assert sum(r["total_tokens"] for r in reported) == res.usage.total_tokens
    assert sum(g["total_tokens"] for g in by_agent) == sum(r.usage.total_tokens for r in results)
    assert sum(g["prompt_tokens"] for g in by_agent) == sum(r.usage.prompt_tokens for r in results)
    assert sum(g["calls"] for g in by_agent) == len(rows)
    known = [r.usage.cost_usd for r in results if r.usage.cost_usd is not None]
    assert abs(sum(g["cost_usd"] or 0 for g in by_agent) - sum(known)) < 1e-9


async def test_row_is_durable_when_complete_returns(make_host, ksi_db_path):
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p1"))) as host:
        async with Database(ksi_db_path) as other:
            for n in range(1, 4):
                req = request()
                await host.complete(req)
                # another connection (as another process would) sees the committed row at once
                row = await other.fetchone("SELECT total_tokens FROM token_usage WHERE request_id = ?", (req.request_id,))
                assert row is not None and row[0] == 15
                assert (await other.fetchone("SELECT COUNT(*) FROM token_usage"))[0] == n


async def test_concurrent_calls_share_commits(make_host):
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p1"))) as host:
        before = host.db.commits
        await asyncio.gather(*(host.complete(request()) for _ in range(200)))
        commits = host.db.commits - before
        assert (await host.db.fetchone("SELECT COUNT(*) FROM token_usage"))[0] == 200
    assert commits < 20  # group commit: many rows per transaction


async def test_rerun_after_restart_counts_the_new_calls_too(make_host, ksi_db_path):
    req = request()
    for run in (1, 2):
        # a restart: a new host on the same file; the request runs again from attempt 1
        async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p1"))) as host:
            await host.complete(req)
            rows = await ledger(host)
        assert cols(rows, "request_id", "attempt") == [(req.request_id, 1)] * run
    async with Database(ksi_db_path) as db:
        assert await db.schema_version("tokens") == len(MIGRATIONS)


async def test_indexes_exist(make_host):
    async with make_host(Plugin()) as host:
        names = {r["name"] for r in await host.db.fetchall("PRAGMA index_list(token_usage)")}
        plan = " ".join(r[3] for r in await host.db.fetchall(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM token_usage WHERE created_at >= 0"))
        sent_plan = " ".join(r[3] for r in await host.db.fetchall("EXPLAIN QUERY PLAN " + MARK_UNKNOWN, (0.0,)))
    assert set(INDEXES) <= names
    assert "token_usage_created_at" in plan
    assert "token_usage_sent" in sent_plan  # a start-up reads only the calls still 'sent'


def test_entry_point_names_the_plugin_class():
    (ep,) = [e for e in entry_points(group="ksi_host") if e.name == "tokens"]
    assert ep.load() is Plugin
