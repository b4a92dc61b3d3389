"""Admission through a real Host (DirectQueue, fake deployments) on virtual time: the windows hold however
many requests run at once, waiters go in arrival order, a waiter that leaves wakes the next."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from ksi_limits.estimate import estimate
from ksi_limits.plugin import Plugin
from ksi_limits.store import LocalWindowStore
from limits_helpers import AwaitingStore, LoggingProvider, VirtualTime, most_in_any_window

from ksi_host import Usage, hookimpl
from ksi_host.testing import DirectQueue, ScriptedProviders


def limits(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"limits": {"rules": list(rules), **top}}


def store_of(kind: str, vt: VirtualTime) -> Any:
    return None if kind == "local" else AwaitingStore(vt.sleep)


@pytest.mark.parametrize("kind", ["local", "awaiting"])
async def test_two_hundred_concurrent_requests_never_exceed_the_tpm_in_any_window(make_host: Any, vt: VirtualTime,
                                                                                  kind: str) -> None:
    rng = random.Random(7)

    def usage(request: Any) -> Usage:  # what the upstream reports: at most the estimate
        guess = estimate(request, 4.0, 1024)
        completion = rng.randint(1, guess.completion)
        return Usage(guess.prompt, completion, guess.prompt + completion)

    dep = LoggingProvider("dep", vt.clock, vt.sleep, latency=3.0, usage=usage)
    config = limits({"scope": "deployment", "match": "dep", "tpm": 2000})
    store = store_of(kind, vt)
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(store), config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:
        requests = [{"model": "m", "agent_id": f"agent{i % 8}", "max_tokens": rng.randint(10, 200),
                     "prompt": "word " * rng.randint(1, 400)} for i in range(200)]
        started = vt.now
        results = await vt.run(asyncio.gather(*(host.complete(r) for r in requests)))
    assert [r.status for r in results] == ["ok"] * 200
    assert all(len(r.attempts) == 1 for r in results)  # waiting is not an attempt
    most = most_in_any_window(dep.sent, 60.0)
    assert 1500 < most <= 2000
    total = sum(s.tokens for s in dep.sent)
    assert vt.now - started >= (total / 2000 - 1) * 60  # the limit held the run back
    assert store is None or store.calls >= 400  # (the awaiting store's path was the one taken)


async def test_rpm_and_concurrency_hold(make_host: Any, vt: VirtualTime) -> None:
    dep = LoggingProvider("dep", vt.clock, vt.sleep, latency=5.0)
    in_flight: list[int] = []
    inner = dep._answer

    async def counting(request: Any) -> Any:
        in_flight.append(1)
        peak.append(len(in_flight))
        try:
            return await inner(request)
        finally:
            in_flight.pop()

    peak: list[int] = []
    dep.script = [counting]
    config = limits({"scope": "deployment", "match": "d*", "rpm": 10, "concurrency": 3, "window_s": 60})
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(), config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:
        results = await vt.run(asyncio.gather(*(host.complete({"model": "m", "prompt": "hi"}) for _ in range(40))))
    assert all(r.ok for r in results)
    assert max(peak) == 3
    assert most_in_any_window(dep.sent, 60.0, tokens=False) == 10


@pytest.mark.parametrize("kind", ["local", "awaiting"])
async def test_a_big_request_is_not_starved_by_small_ones_behind_it(make_host: Any, vt: VirtualTime, kind: str) -> None:
    dep = LoggingProvider("dep", vt.clock, vt.sleep, latency=1.0,
                          usage=lambda r: Usage(0, r.max_tokens, r.max_tokens))
    config = limits({"scope": "deployment", "match": "dep", "tpm": 100, "window_s": 10}, chars_per_token=1000.0)
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(store_of(kind, vt)), config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:

        async def small_stream() -> None:  # a small request every second, for a minute
            for i in range(60):
                asyncio.ensure_future(host.complete({"model": "m", "prompt": "s", "max_tokens": 26,
                                                     "request_id": f"small{i}"}))
                await vt.sleep(1.0)

        async def scenario() -> Any:
            smalls = asyncio.ensure_future(small_stream())
            await vt.sleep(2.5)
            big = await host.complete({"model": "m", "prompt": "b", "max_tokens": 90, "request_id": "big"})
            await smalls
            return big

        big = await vt.run(scenario())
    assert big.ok
    order = [s.request_id for s in dep.sent]
    sent_at = {s.request_id: s.at for s in dep.sent}
    # every small request that arrived after the big one was sent after it
    assert all(sent_at[f"small{i}"] > sent_at["big"] for i in range(3, 60) if f"small{i}" in sent_at)
    assert order.index("big") < 10


async def test_an_estimate_over_the_limit_fails_at_once_naming_the_rule(make_host: Any, vt: VirtualTime) -> None:
    dep = LoggingProvider("dep", vt.clock, vt.sleep)
    config = limits({"scope": "agent", "match": "a*", "rpm": 100}, {"scope": "deployment", "match": "dep", "tpm": 500})
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(), config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:
        result = await vt.run(host.complete({"model": "m", "prompt": "x" * 100, "max_tokens": 490, "agent_id": "a1"}))
    assert result.error is not None and result.error["type"] == "BadRequest"
    assert "limits.rules[1] (deployment 'dep') allows 500 tokens per 60 s" in result.error["message"]
    assert "estimated 522 tokens" in result.error["message"]
    assert dep.sent == []


async def test_a_waiter_cut_off_by_its_deadline_wakes_the_one_behind_it(make_host: Any) -> None:
    """Real time: the host ends the wait at the deadline; the request behind it, which fits, goes at once."""
    dep = LoggingProvider("dep", time.monotonic, asyncio.sleep)
    plugin = Plugin()
    config = limits({"scope": "deployment", "match": "dep", "tpm": 100}, chars_per_token=1000.0)
    async with make_host(DirectQueue(), ScriptedProviders(dep), plugin, config=config) as host:
        first = await host.complete({"model": "m", "prompt": "a", "max_tokens": 40})  # 15 counted after the true-up
        assert first.ok
        t0 = time.monotonic()
        big = asyncio.ensure_future(host.complete({"model": "m", "prompt": "b", "max_tokens": 90, "timeout_s": 0.3}))
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(host.complete({"model": "m", "prompt": "c", "max_tokens": 40}))
        await asyncio.sleep(0.05)
        assert not small.done()  # it would fit, but it arrived after the big one: it waits behind it
        async with asyncio.timeout(5):
            big_result = await big
            small_result = await small
        waited = time.monotonic() - t0
    assert big_result.error is not None and big_result.error["type"] == "DeadlineExceeded"
    assert "waited for admission to dep" in big_result.error["message"]
    assert small_result.ok and waited < 1.0
    assert len(dep.sent) == 2
    assert plugin.admission is not None and plugin.admission.queues == {}


async def test_room_freed_by_a_true_up_wakes_the_waiter(make_host: Any, vt: VirtualTime) -> None:
    dep = LoggingProvider("dep", vt.clock, vt.sleep, latency=2.0, usage=lambda r: Usage(1, 1, 2))
    config = limits({"scope": "deployment", "match": "dep", "tpm": 100, "window_s": 1000}, chars_per_token=1000.0)
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(), config=config, clock=vt.clock,
                         sleep=vt.sleep) as host:
        results = await vt.run(asyncio.gather(*(host.complete({"model": "m", "prompt": "x", "max_tokens": 80})
                                                for _ in range(3))))
    assert all(r.ok for r in results)
    # each reserved 88 (80 + 8 framing); only one fits at a time until its true-up to 2 frees the rest
    assert [s.at for s in dep.sent] == [1000.0, 1002.0, 1004.0]


async def test_two_hosts_sharing_one_store_hold_one_limit_between_them(make_host: Any, vt: VirtualTime,
                                                                      tmp_path: Any) -> None:
    """What a shared store (ksi-postgres) gives: one window for two hosts. Room freed by one host wakes
    nobody in the other: its waiters look again every poll_s (here 5 s)."""
    shared = AwaitingStore(vt.sleep, poll_s=5.0)
    deps = [LoggingProvider("dep", vt.clock, vt.sleep, latency=2.0) for _ in range(2)]
    config = limits({"scope": "deployment", "match": "dep", "tpm": 300, "window_s": 20}, chars_per_token=1000.0)
    hosts = [make_host(DirectQueue(), ScriptedProviders(dep), Plugin(shared), config=config, clock=vt.clock,
                       sleep=vt.sleep, db_path=tmp_path / f"h{i}.db") for i, dep in enumerate(deps)]
    async with hosts[0] as a, hosts[1] as b:
        batch = [host.complete({"model": "m", "prompt": "x", "max_tokens": 40}) for host in (a, b) for _ in range(25)]
        results = await vt.run(asyncio.gather(*batch))
    assert all(r.ok for r in results)
    sent = deps[0].sent + deps[1].sent
    assert len(deps[0].sent) > 5 and len(deps[1].sent) > 5
    assert most_in_any_window(sent, 20.0) <= 300


class OffersStore:
    """A plugin keeping state shared by hosts (as ksi-postgres): it offers the store of rate windows."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.asked = 0

    @hookimpl
    def ksi_window_store(self, host: Any) -> Any:
        self.asked += 1
        return self.store


async def test_a_store_offered_through_ksi_window_store_holds_the_windows_of_two_hosts(make_host: Any, vt: VirtualTime,
                                                                                      tmp_path: Any) -> None:
    """Plugin() without a store asks ``ksi_window_store`` at start-up: the two hosts below each get the one
    store their other plugin offers, so they hold one limit between them (each alone would let 300 through)."""
    shared = AwaitingStore(vt.sleep, poll_s=5.0)
    offers = [OffersStore(shared), OffersStore(shared)]
    deps = [LoggingProvider("dep", vt.clock, vt.sleep, latency=2.0) for _ in range(2)]
    config = limits({"scope": "deployment", "match": "dep", "tpm": 300, "window_s": 20}, chars_per_token=1000.0)
    limiters = [Plugin(), Plugin()]
    hosts = [make_host(DirectQueue(), ScriptedProviders(dep), offer, limiter, config=config, clock=vt.clock,
                       sleep=vt.sleep, db_path=tmp_path / f"h{i}.db")
             for i, (dep, offer, limiter) in enumerate(zip(deps, offers, limiters, strict=True))]
    async with hosts[0] as a, hosts[1] as b:
        assert all(lim.store is shared for lim in limiters) and [o.asked for o in offers] == [1, 1]
        batch = [host.complete({"model": "m", "prompt": "x", "max_tokens": 40}) for host in (a, b) for _ in range(25)]
        results = await vt.run(asyncio.gather(*batch))
        rows = (await a.status())["limits"]
    assert all(r.ok for r in results)
    assert len(deps[0].sent) > 5 and len(deps[1].sent) > 5
    assert most_in_any_window(deps[0].sent + deps[1].sent, 20.0) <= 300
    assert rows[0]["name"] == "dep" and rows[0]["requests"] >= 1  # status reads the offered store


async def test_without_an_offer_or_with_none_the_windows_stay_in_this_process(make_host: Any) -> None:
    none = OffersStore(None)
    limiter = Plugin()
    async with make_host(DirectQueue(), none, limiter, config=limits({"scope": "deployment", "rpm": 5})):
        assert none.asked == 1 and isinstance(limiter.store, LocalWindowStore)
