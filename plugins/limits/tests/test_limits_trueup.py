"""What an attempt leaves in its windows once it ended: the reported usage, its reservation, or nothing."""

from __future__ import annotations

from typing import Any

import pytest
from ksi_limits.plugin import Plugin

from ksi_host import BudgetExceeded, ProviderResponse, ProviderTimeout, RateLimited, Usage, hookimpl
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

CONFIG = {"limits": {"rules": [{"scope": "deployment", "match": "dep", "rpm": 100, "tpm": 1000}]}}
PROMPT = {"model": "m", "prompt": "hello", "max_tokens": 91}  # estimate: 2 + 4 + 3 framing + 91 = 100


async def window(host: Any) -> tuple[int, int, int]:
    (row,) = (await host.status())["limits"]
    return row["tokens"], row["requests"], row["in_flight"]


@pytest.mark.parametrize(("answer", "usage", "expected"), [
    ("ok", Usage(10, 5, 15), (15, 1, 0)),                    # reported usage replaces the reservation
    ("ok", None, (100, 1, 0)),                                # answered without usage: the reservation stays
    (ProviderTimeout("no answer"), None, (100, 1, 0)),        # outcome unknown: it may have been counted
    (RateLimited("429"), None, (0, 1, 0)),                    # failed without usage: its tokens go, its request stays
    (RateLimited("429", usage=Usage(7, 0, 7)), None, (7, 1, 0)),  # a failure that reported usage counts it
])
async def test_the_true_up(make_host: Any, answer: Any, usage: Usage | None, expected: tuple[int, int, int]) -> None:
    dep = FakeProvider("dep", script=[answer], usage=usage)
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(), config=CONFIG) as host:
        await host.complete(PROMPT)
        assert await window(host) == expected


async def test_a_reservation_counts_while_the_call_is_in_flight(make_host: Any) -> None:
    import asyncio

    gate = asyncio.Event()
    seen: list[tuple[int, int, int]] = []

    async def slow(request: Any) -> ProviderResponse:
        seen.append(await window(host))
        await gate.wait()
        return ProviderResponse("ok", usage=Usage(1, 1, 2))

    dep = FakeProvider("dep", script=[slow])
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(), config=CONFIG) as host:
        task = asyncio.ensure_future(host.complete(PROMPT))
        while not seen:
            await asyncio.sleep(0.01)
        gate.set()
        await task
        assert seen == [(100, 1, 1)]
        assert await window(host) == (2, 1, 0)


class RefuseAfter:
    """An admitting plugin that refuses every attempt after the limits plugin admitted it."""

    @hookimpl
    def ksi_admit(self, request: Any) -> None:
        raise BudgetExceeded("refused by another plugin")


async def test_an_attempt_that_sent_nothing_leaves_no_trace(make_host: Any) -> None:
    dep = FakeProvider("dep")
    plugin = Plugin()
    # hookimpls run newest-registered first: the limits plugin admits, then RefuseAfter refuses
    async with make_host(DirectQueue(), ScriptedProviders(dep), RefuseAfter(), plugin, config=CONFIG) as host:
        result = await host.complete(PROMPT)
        assert result.error is not None and result.error["message"] == "refused by another plugin"
        assert await window(host) == (0, 0, 0)
    assert dep.calls == [] and plugin.leases == {}


async def test_every_attempt_is_trued_up_on_its_own(make_host: Any) -> None:
    from ksi_host.testing import FailOver

    a = FakeProvider("dep", script=[RateLimited("429")])
    b = FakeProvider("other", usage=Usage(3, 3, 6))
    config = {"limits": {"rules": [{"scope": "deployment", "match": "*", "tpm": 1000}]}}
    async with make_host(DirectQueue(), ScriptedProviders(a, b), FailOver(), Plugin(), config=config) as host:
        result = await host.complete(PROMPT)
        assert result.ok and [x.provider for x in result.attempts] == ["dep", "other"]
        rows = {r["name"]: (r["tokens"], r["requests"], r["in_flight"]) for r in (await host.status())["limits"]}
    assert rows == {"dep": (0, 1, 0), "other": (6, 1, 0)}


async def test_a_reservation_whose_answer_was_cut_off_by_the_deadline_is_released(make_host: Any) -> None:
    """A shared store took the lease, but the deadline cut the admission off before the answer came back:
    ksi_attempt_finished still releases it."""
    import asyncio

    from limits_helpers import AwaitingStore

    store = AwaitingStore(asyncio.sleep, answer_after_s=0.5)
    dep = FakeProvider("dep")
    async with make_host(DirectQueue(), ScriptedProviders(dep), Plugin(store), config=CONFIG) as host:
        result = await host.complete({**PROMPT, "timeout_s": 0.1})
        assert result.error is not None and result.error["type"] == "DeadlineExceeded"
        assert store.inner.leases == {}
        state = store.inner.snapshot(0.0)[(0, "dep")]
    assert (state.tokens, state.requests, state.in_flight) == (0, 0, 0) and dep.calls == []
