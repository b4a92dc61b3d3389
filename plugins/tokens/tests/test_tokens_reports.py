"""The usage reports (``host.usage_report`` / ``ksi-host usage``) and the status section."""

from __future__ import annotations

import pytest
from ksi_tokens.plugin import Plugin
from tokens_helpers import RetryPolicy, record, request, start

from ksi_host.errors import MissingPluginError, ProviderUnavailable, ValidationError
from ksi_host.models import Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

DAY1 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
DAY2 = DAY1 + 86_400  # 2023-11-15
KEYS = {"key", "calls", "requests", "unknown_calls", "in_flight_calls", "prompt_tokens", "completion_tokens", "total_tokens",
        "cost_usd", "unpriced_calls", "cached_tokens", "reasoning_tokens"}


async def seed(host):
    """Four requests, five calls; r1 failed over from p1 to p2."""
    r1 = request(model="big", agent_id="alice", session_id="s1", purpose="plan")
    r2 = request(model="small", agent_id="alice", session_id="s1", purpose="chat")
    r3 = request(model="small", agent_id="bob", session_id="s2", purpose="chat")
    r4 = request(model="small")  # no agent, session or purpose
    await record(host, r1, attempt=1, provider="p1", usage=Usage(100, 0, 100, 0.10), outcome="ProviderUnavailable", created_at=DAY1)
    await record(host, r1, attempt=2, provider="p2", usage=Usage(100, 50, 150, 0.20), created_at=DAY1 + 1)
    await record(host, r2, provider="p1", usage=Usage(10, 5, 15, None), created_at=DAY1 + 2)
    await record(host, r3, provider="p2", usage=Usage(20, 10, 30, 0.03), created_at=DAY2)
    await record(host, r4, provider="p1", usage=Usage(1, 1, 2, None), created_at=DAY2 + 1)


def table(report):
    return {g["key"]: (g["calls"], g["requests"], g["prompt_tokens"], g["completion_tokens"], g["total_tokens"],
                       None if g["cost_usd"] is None else round(g["cost_usd"], 9), g["unpriced_calls"]) for g in report}


@pytest.mark.parametrize("by, expected", [
    ("model", {"big": (2, 1, 200, 50, 250, 0.3, 0), "small": (3, 3, 31, 16, 47, 0.03, 2)}),
    ("agent", {"alice": (3, 2, 210, 55, 265, 0.3, 1), "bob": (1, 1, 20, 10, 30, 0.03, 0), None: (1, 1, 1, 1, 2, None, 1)}),
    ("session", {"s1": (3, 2, 210, 55, 265, 0.3, 1), "s2": (1, 1, 20, 10, 30, 0.03, 0), None: (1, 1, 1, 1, 2, None, 1)}),
    ("purpose", {"plan": (2, 1, 200, 50, 250, 0.3, 0), "chat": (2, 2, 30, 15, 45, 0.03, 1), None: (1, 1, 1, 1, 2, None, 1)}),
    # r1 called both deployments: it is a request of each
    ("provider", {"p1": (3, 3, 111, 6, 117, 0.1, 2), "p2": (2, 2, 120, 60, 180, 0.23, 0)}),
    ("day", {"2023-11-14": (3, 2, 210, 55, 265, 0.3, 1), "2023-11-15": (2, 2, 21, 11, 32, 0.03, 1)}),
    ("total", {None: (5, 4, 231, 66, 297, 0.33, 2)}),
])
async def test_every_grouping(make_host, by, expected):
    async with make_host(Plugin()) as host:
        await seed(host)
        report = await host.usage_report(by)
    assert all(set(g) == KEYS for g in report)
    assert table(report) == expected
    assert all(g["unknown_calls"] == g["in_flight_calls"] == 0 for g in report)


async def test_order_is_most_tokens_first_and_days_in_order(make_host):
    async with make_host(Plugin()) as host:
        await seed(host)
        assert [g["key"] for g in await host.usage_report("agent")] == ["alice", "bob", None]
        assert [g["key"] for g in await host.usage_report("provider")] == ["p2", "p1"]
        assert [g["key"] for g in await host.usage_report("day")] == ["2023-11-14", "2023-11-15"]


async def test_since_keeps_calls_at_or_after_it(make_host):
    async with make_host(Plugin()) as host:
        await seed(host)
        assert table(await host.usage_report("model", DAY1 + 1)) == {
            "big": (1, 1, 100, 50, 150, 0.2, 0), "small": (3, 3, 31, 16, 47, 0.03, 2)}
        assert table(await host.usage_report("total", DAY2)) == {None: (2, 2, 21, 11, 32, 0.03, 1)}
        assert await host.usage_report("model", DAY2 + 2) == []
        assert await host.usage_report("total", DAY2 + 2) == []


async def test_cost_is_null_only_when_no_call_of_the_group_had_a_known_cost(make_host):
    async with make_host(Plugin()) as host:
        r = request(model="free")
        await record(host, r, usage=Usage(1, 1, 2, None))
        await record(host, r, attempt=2, usage=Usage(1, 1, 2, None))
        await record(host, request(model="zero"), usage=Usage(1, 1, 2, 0.0))
        await record(host, request(model="mixed"), usage=Usage(1, 1, 2, None))
        await record(host, request(model="mixed"), usage=Usage(1, 1, 2, 0.5))
        report = {g["key"]: g for g in await host.usage_report("model")}
    assert report["free"]["cost_usd"] is None and report["free"]["unpriced_calls"] == 2
    assert report["zero"]["cost_usd"] == 0.0 and report["zero"]["unpriced_calls"] == 0
    assert report["mixed"]["cost_usd"] == 0.5 and report["mixed"]["unpriced_calls"] == 1


async def test_empty_ledger_reports_nothing(make_host):
    async with make_host(Plugin()) as host:
        assert await host.usage_report("model") == []
        assert await host.status() == {"usage": {"calls": 0, "unknown_calls": 0, "in_flight_calls": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0, "total_tokens": 0, "cost_usd": None}}


@pytest.mark.parametrize("by", ["models", "agent_id", "", None, "day; DROP TABLE token_usage"])
async def test_unknown_grouping_is_a_validation_error(make_host, by):
    async with make_host(Plugin()) as host:
        await seed(host)
        with pytest.raises(ValidationError) as e:
            await host.usage_report(by)
        assert e.value.field == "by"
        assert "model, agent, session, purpose, provider, day" in str(e.value)
        assert len(await host.usage_report("model")) == 2


@pytest.mark.parametrize("since", ["24h", True, [1]])
async def test_since_must_be_unix_seconds(make_host, since):
    async with make_host(Plugin()) as host:
        with pytest.raises(ValidationError) as e:
            await host.usage_report("model", since)
    assert e.value.field == "since"


async def test_status_sums_the_ledger(make_host):
    async with make_host(Plugin()) as host:
        await seed(host)
        status = (await host.status())["usage"]
    assert status["calls"] == 5 and status["total_tokens"] == 297
    assert (status["prompt_tokens"], status["completion_tokens"]) == (231, 66)
    assert round(status["cost_usd"], 9) == 0.33


async def seed_unsettled(host):
    """Calls without usage beside the seed: a 429, a call the host stopped waiting for, one still in flight."""
    r5 = request(model="small", agent_id="bob", session_id="s2", purpose="chat")
    r6 = request(model="big", agent_id="carol")
    await record(host, r5, provider="p2", usage=None, outcome="RateLimited", created_at=DAY2 + 2)
    await record(host, r5, attempt=2, provider="p2", usage=None, outcome="unknown", created_at=DAY2 + 3)
    await record(host, r5, attempt=3, provider="p1", usage=Usage(7, 3, 10, 0.01), created_at=DAY2 + 4)
    await start(host, r6, provider="p1", created_at=DAY2 + 5)


@pytest.mark.parametrize("by, expected", [
    # (calls, requests, unknown_calls, in_flight_calls, total_tokens, unpriced_calls)
    ("model", {"big": (3, 2, 1, 1, 250, 0), "small": (6, 4, 1, 0, 57, 2)}),
    ("agent", {"alice": (3, 2, 0, 0, 265, 1), "bob": (4, 2, 1, 0, 40, 0), "carol": (1, 1, 1, 1, 0, 0),
               None: (1, 1, 0, 0, 2, 1)}),
    ("provider", {"p1": (5, 5, 1, 1, 127, 2), "p2": (4, 3, 1, 0, 180, 0)}),
    ("day", {"2023-11-14": (3, 2, 0, 0, 265, 1), "2023-11-15": (6, 4, 2, 1, 42, 1)}),
    ("total", {None: (9, 6, 2, 1, 307, 2)}),
])
async def test_calls_of_unknown_outcome_and_in_flight_are_counted(make_host, by, expected):
    async with make_host(Plugin(), serve=False) as host:
        await seed(host)
        await seed_unsettled(host)
        report = await host.usage_report(by)
        status = (await host.status())["usage"]
    assert {g["key"]: (g["calls"], g["requests"], g["unknown_calls"], g["in_flight_calls"], g["total_tokens"],
                       g["unpriced_calls"]) for g in report} == expected
    assert (status["calls"], status["unknown_calls"], status["in_flight_calls"], status["total_tokens"]) == (9, 2, 1, 307)
    # a group whose calls reported no usage sums to 0 tokens (the tokens reported), and no cost
    assert all(isinstance(g[k], int) for g in report for k in ("prompt_tokens", "completion_tokens", "total_tokens"))


async def test_report_through_the_host_after_retries(make_host):
    a = FakeProvider("a", script=[ProviderUnavailable("down", usage=Usage(2, 0, 2, 0.1))])
    b = FakeProvider("b", usage=Usage(5, 5, 10, 0.5))
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(a, b), RetryPolicy()) as host:
        results = [await host.complete(request(model="m", agent_id="x")) for _ in range(3)]
        report = await host.usage_report("provider")
        total = await host.usage_report("total")
    assert table(report) == {"b": (3, 3, 15, 15, 30, 1.5, 0), "a": (3, 3, 6, 0, 6, 0.3, 0)}
    assert total[0]["total_tokens"] == sum(r.usage.total_tokens for r in results) == 36
    assert total[0]["requests"] == 3


async def test_without_the_plugin_the_host_names_it(make_host):
    async with make_host(DirectQueue()) as host:
        with pytest.raises(MissingPluginError, match="ksi-tokens"):
            await host.usage_report("model")


async def test_cached_and_reasoning_tokens_are_columns_summed_where_reported(make_host):
    from ksi_host import ProviderResponse, Usage
    from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

    answers = [ProviderResponse("a", usage=Usage(100, 20, 120, None, cached_tokens=64, reasoning_tokens=8)),
               ProviderResponse("b", usage=Usage(10, 2, 12, None)),  # reported neither
               ProviderResponse("c", usage=Usage(50, 30, 80, None, cached_tokens=0, reasoning_tokens=25))]
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(FakeProvider("p", script=answers))) as host:
        for i in range(3):
            await host.complete({"model": "m", "prompt": f"q{i}", "agent_id": "x"})
        rows = await host.db.fetchall("SELECT cached_tokens, reasoning_tokens FROM token_usage ORDER BY id")
        (total,) = await host.usage_report("total")
    assert [tuple(r) for r in rows] == [(64, 8), (None, None), (0, 25)]  # unknown stays NULL, not 0
    assert (total["cached_tokens"], total["reasoning_tokens"]) == (64, 33)
