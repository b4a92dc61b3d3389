"""ksi_status (each window, each budget) and the windows' start from the ledger."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ksi_limits.plugin import Plugin
from limits_helpers import FakeLedger, LoggingProvider, VirtualTime, row

from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


async def test_status_shows_every_window_and_budget(make_host: Any) -> None:
    ledger = FakeLedger({"agent": [row("a1", cost=0.25)]})
    config = {"limits": {
        "rules": [{"scope": "deployment", "match": "dep", "rpm": 10, "tpm": 2000, "window_s": 30},
                  {"scope": "agent", "match": "a*", "concurrency": 2}],
        "budgets": [{"scope": "agent", "match": "a*", "usd": 1.0}, {"scope": "agent", "match": "zed", "usd": 2.0}],
    }}
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), ledger, Plugin(), config=config) as host:
        before = await host.status()
        assert (await host.complete({"model": "m", "prompt": "hi", "agent_id": "a2"})).ok
        after = await host.status()
    assert before["limits"] == [{"rule": "rules[0]", "scope": "deployment", "name": "dep", "window_s": 30.0,
                                 "requests": 0, "rpm": 10, "tokens": 0, "tpm": 2000, "in_flight": 0,
                                 "concurrency": None, "waiting": 0}]
    assert [(r["rule"], r["name"], r["requests"], r["tokens"]) for r in after["limits"]] == [
        ("rules[0]", "dep", 1, 15), ("rules[1]", "a2", 1, 15)]
    assert [(b["budget"], b["name"], b["spent_usd"], b["left_usd"]) for b in after["budgets"]] == [
        ("budgets[0]", "a1", 0.25, 0.75), ("budgets[1]", "zed", 0.0, 2.0)]


async def test_nothing_configured_no_section_and_no_cost(make_host: Any) -> None:
    plugin = Plugin()
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), plugin) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
        assert "limits" not in await host.status()
    assert plugin.leases == {}


async def test_the_windows_start_from_what_the_ledger_holds_of_the_last_window(make_host: Any, vt: VirtualTime) -> None:
    ledger = FakeLedger({"provider": [row("dep", calls=3, tokens=95), row("elsewhere", calls=50, tokens=5000)],
                         "agent": [row("a", calls=2, tokens=10)]})
    dep = LoggingProvider("dep", vt.clock, vt.sleep)
    config = {"limits": {"rules": [{"scope": "deployment", "match": "dep", "tpm": 100, "window_s": 60},
                                   {"scope": "agent", "match": "*", "rpm": 5, "window_s": 10}]}}
    t0 = time.time()
    async with make_host(DirectQueue(), ScriptedProviders(dep), ledger, Plugin(), config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:
        rows = {(r["rule"], r["name"]): (r["requests"], r["tokens"]) for r in (await host.status())["limits"]}
        result = await vt.run(host.complete({"model": "m", "prompt": "hi", "max_tokens": 4, "agent_id": "a"}))
    assert rows == {("rules[0]", "dep"): (3, 95), ("rules[1]", "a"): (2, 10)}
    assert result.ok and dep.sent[0].at == 1060.0  # the seeded 95 tokens count for a window from the start
    assert [by for by, _ in ledger.asked] == ["provider", "agent"]
    assert all(t0 - 61 <= since <= time.time() for _, since in ledger.asked)


async def test_seeding_happens_once_for_concurrent_first_admissions(make_host: Any) -> None:
    ledger = FakeLedger({"provider": [row("dep", calls=1, tokens=1)]}, delay_s=0.05)
    config = {"limits": {"rules": [{"scope": "deployment", "match": "dep", "tpm": 10000}]}}
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), ledger, Plugin(), config=config) as host:
        results = await asyncio.gather(*(host.complete({"model": "m", "prompt": "hi"}) for _ in range(5)))
    assert all(r.ok for r in results) and len(ledger.asked) == 1


async def test_a_ledger_reading_left_behind_by_a_deadline_stops_with_the_host(make_host: Any) -> None:
    ledger = FakeLedger({"provider": []}, delay_s=3600)  # a reading that never ends
    plugin = Plugin()
    config = {"limits": {"rules": [{"scope": "deployment", "match": "dep", "tpm": 10000}]}}
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), ledger, plugin, config=config) as host:
        result = await host.complete({"model": "m", "prompt": "hi", "timeout_s": 0.1})
        assert result.error is not None and result.error["type"] == "DeadlineExceeded"
        assert plugin._seeding is not None and not plugin._seeding.done()  # shielded: it goes on for the others
    assert plugin._seeding.cancelled()


async def test_a_budgets_row_counts_the_calls_its_spend_leaves_out(make_host: Any) -> None:
    """Calls of unknown cost count zero against a budget: its status says how many there were, so a spend of
    $0 after many calls to an unpriced model is not read as nothing spent."""
    ledger = FakeLedger({"agent": [row("writer", cost=None, calls=4, tokens=120, unpriced=4),
                                   row("researcher", cost=0.5, calls=4, tokens=120)]})
    config = {"limits": {"budgets": [{"scope": "agent", "match": "*", "usd": 5.0}]}}
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("dep")), ledger, Plugin(), config=config) as host:
        rows = (await host.status())["budgets"]
    assert [(b["name"], b["spent_usd"], b["unpriced_calls"]) for b in rows] == [("researcher", 0.5, 0), ("writer", 0.0, 4)]
