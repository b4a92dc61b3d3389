"""Budgets: spend from the ledger, plus true-ups seen, plus calls in flight; refused before anything is sent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from ksi_limits.budgets import BudgetBook, period_bounds
from ksi_limits.config import BudgetRule
from ksi_limits.plugin import Plugin
from limits_helpers import FakeLedger, VirtualTime, row

from ksi_host import StartupError, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


class PricedProvider(FakeProvider):
    """A deployment with a price: every call costs ``usd`` whatever its tokens."""

    def __init__(self, name: str, usd: float, **kw: Any) -> None:
        super().__init__(name, usage=Usage(10, 5, 15, usd), **kw)
        self.usd = usd

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.usd


def budgets(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"limits": {"budgets": list(entries), **top}}


async def test_an_agent_at_its_budget_is_refused_and_the_others_go_on(make_host: Any) -> None:
    ledger = FakeLedger({"agent": [row("planner", cost=5.0), row("coder", cost=1.0)]})
    dep = FakeProvider("dep")
    config = budgets({"scope": "agent", "match": "*", "usd": 5.0, "period": "day"})
    async with make_host(DirectQueue(), ScriptedProviders(dep), ledger, Plugin(), config=config) as host:
        refused = await host.complete({"model": "m", "prompt": "hi", "agent_id": "planner"})
        served = await host.complete({"model": "m", "prompt": "hi", "agent_id": "coder"})
    assert refused.error is not None and refused.error["type"] == "BudgetExceeded"
    message = refused.error["message"]
    assert message.startswith("budget exceeded for agent 'planner': it spent $5.000000 of the day's $5.00 "
                              "(limits.budgets[0]: agent '*', since ")
    assert message.endswith("nothing was sent")
    assert len(refused.attempts) == 1 and refused.attempts[0].error_type == "BudgetExceeded"
    assert served.ok and [r.agent_id for r in dep.calls] == ["coder"]
    day = period_bounds("day", datetime.now(UTC).timestamp())[0]
    assert ledger.asked[0] == ("agent", day)


async def test_spend_seen_by_this_process_counts_without_reading_the_ledger_again(make_host: Any) -> None:
    ledger = FakeLedger()
    dep = FakeProvider("dep", usage=Usage(10, 5, 15, 1.0))
    config = budgets({"scope": "agent", "match": "a", "usd": 2.5}, budget_refresh_s=3600)
    async with make_host(DirectQueue(), ScriptedProviders(dep), ledger, Plugin(), config=config) as host:
        results = [await host.complete({"model": "m", "prompt": "hi", "agent_id": "a"}) for _ in range(5)]
    # no price: a call counts zero until it ends, so the third (at $2.00 of $2.50) still goes
    assert [r.status for r in results] == ["ok", "ok", "ok", "error", "error"]
    assert "it spent $3.000000 of the day's $2.50" in (results[3].error or {})["message"]
    assert len(ledger.asked) == 1


async def test_a_priced_call_in_flight_counts_its_estimate(make_host: Any) -> None:
    gate = asyncio.Event()

    async def slow(request: Any) -> Any:
        await gate.wait()
        return "ok"

    dep = PricedProvider("dep", 1.0, script=[slow])
    config = budgets({"scope": "purpose", "match": "review", "usd": 3.5})
    async with make_host(DirectQueue(), ScriptedProviders(dep), FakeLedger(), Plugin(), config=config) as host:
        tasks = [asyncio.ensure_future(host.complete({"model": "m", "prompt": "hi", "agent_id": f"a{i}",
                                                      "purpose": "review"})) for i in range(10)]
        async with asyncio.timeout(5):  # three calls held at the gate, seven refused
            while len(dep.calls) < 3 or sum(t.done() for t in tasks) < 7:
                await asyncio.sleep(0.01)
        status = (await host.status())["budgets"]
        gate.set()
        results = await asyncio.gather(*tasks)
    assert sorted(r.status for r in results) == ["error"] * 7 + ["ok"] * 3
    assert len(dep.calls) == 3
    assert status == [{"budget": "budgets[0]", "scope": "purpose", "name": "review", "period": "day",
                       "since": status[0]["since"], "usd": 3.5, "spent_usd": 0.0, "in_flight_usd": 3.0,
                       "left_usd": 0.5, "unpriced_calls": 0}]
    message = next(r.error["message"] for r in results if r.error)
    assert message.startswith("budget exceeded for agent 'a")
    assert "purpose 'review' spent $0.000000 of the day's $3.50 (limits.budgets[0]: purpose 'review', since " in message
    assert message.endswith("; $3.000000 more is in flight; this call to dep is estimated at $1.000000; nothing was sent")


async def test_the_ledger_is_read_again_after_budget_refresh_s(make_host: Any, vt: VirtualTime) -> None:
    ledger = FakeLedger({"total": [row(None, cost=1.0)]})
    config = budgets({"scope": "total", "usd": 10.0, "period": "month"}, budget_refresh_s=5)
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), ledger, Plugin(), config=config,
                         clock=vt.clock, sleep=vt.sleep) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
        ledger.rows["total"] = [row(None, cost=10.0)]  # another process spent the rest
        vt.now += 4.9
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok  # still the reading of 4.9 s ago
        vt.now += 0.1
        refused = await host.complete({"model": "m", "prompt": "hi", "agent_id": "x"})
    assert refused.error is not None and "all agents together spent $10.000000 of the month's $10.00" \
        in refused.error["message"]
    assert [by for by, _ in ledger.asked] == ["total", "total"]


async def test_requests_without_an_agent_or_purpose_are_outside_those_budgets(make_host: Any) -> None:
    ledger = FakeLedger({"agent": [row("a", cost=9.0)], "purpose": [row("p", cost=9.0)]})
    config = budgets({"scope": "agent", "usd": 1.0}, {"scope": "purpose", "usd": 1.0})
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), ledger, Plugin(), config=config) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
        assert (await host.complete({"model": "m", "prompt": "hi", "agent_id": "b", "purpose": "q"})).ok
        assert not (await host.complete({"model": "m", "prompt": "hi", "agent_id": "b", "purpose": "p"})).ok


async def test_budgets_need_the_ledger(make_host: Any) -> None:
    with pytest.raises(StartupError, match="budgets need the usage ledger .* pip install ksi-tokens"):
        async with make_host(DirectQueue(), Plugin(), config=budgets({"scope": "total", "usd": 1.0})):
            pass


async def test_a_new_period_reads_the_ledger_again_and_forgets_the_old_true_ups() -> None:
    wall = [datetime(2025, 3, 31, 23, 59, tzinfo=UTC).timestamp()]
    reads: list[tuple[str, float]] = []
    spent = {"day": 4.0}

    async def report(by: str, since: float) -> list[dict[str, Any]]:
        reads.append((by, since))
        return [row("a", cost=spent["day"])]

    book = BudgetBook([BudgetRule("agent", 5.0, "a", "day")], 3600.0, report, lambda: 0.0, lambda: wall[0])
    from ksi_host.models import CompletionRequest

    request = CompletionRequest("m", [{"role": "user", "content": "hi"}], agent_id="a")
    await book.fresh()
    book.hold("l1", request, 0.0)
    book.settle("l1", 2.0)  # $6 now: over
    with pytest.raises(Exception, match="spent \\$6.000000 of the day's \\$5.00"):
        book.check(request, 0.0, "dep")
    wall[0] += 120  # 00:01 on April 1st
    spent["day"] = 0.5
    await book.fresh()
    book.check(request, 0.0, "dep")
    assert [since for _, since in reads] == [datetime(2025, 3, 31, tzinfo=UTC).timestamp(),
                                             datetime(2025, 4, 1, tzinfo=UTC).timestamp()]
    assert period_bounds("month", wall[0]) == (datetime(2025, 4, 1, tzinfo=UTC).timestamp(),
                                               datetime(2025, 5, 1, tzinfo=UTC).timestamp())


async def test_spend_that_grew_while_an_attempt_waited_refuses_it_then(make_host: Any, vt: VirtualTime) -> None:
    from limits_helpers import LoggingProvider

    dep = LoggingProvider("dep", vt.clock, vt.sleep, latency=1.0, usage=lambda r: Usage(10, 5, 15, 1.0))
    plugin = Plugin()
    config = {"limits": {"rules": [{"scope": "deployment", "match": "dep", "concurrency": 1}],
                         "budgets": [{"scope": "agent", "match": "a", "usd": 2.5}]}}
    async with make_host(DirectQueue(), ScriptedProviders(dep), FakeLedger(), plugin, config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:
        results = await vt.run(asyncio.gather(*(host.complete({"model": "m", "prompt": "hi", "agent_id": "a"})
                                                for _ in range(4))))
        (window,) = (await host.status())["limits"]
    # all four passed the check before waiting (nothing spent yet); the fourth, let through after three calls
    # had spent $3, is refused then
    assert [r.status for r in results] == ["ok", "ok", "ok", "error"]
    assert "it spent $3.000000 of the day's $2.50" in (results[3].error or {})["message"]
    assert len(dep.sent) == 3 and window["in_flight"] == 0 and plugin.leases == {}
