"""End to end through a real Host: DirectQueue, scripted providers, a fake clock (no real sleeping)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from ksi_retry import Plugin
from retry_fakes import FakeClock, TimedProvider

from ksi_host import hookimpl
from ksi_host.errors import (
    AuthFailed,
    BadRequest,
    ContextWindowExceeded,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ksi_host.models import CompletionRequest, CompletionResult, ProviderInfo
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "hi"}]


def trail(result: CompletionResult) -> list[tuple[int, str | None, str | None, float | None]]:
    return [(a.number, a.provider, a.error_type, a.delay_s) for a in result.attempts]


async def run(make_host: Any, clock: FakeClock, *providers: FakeProvider, plugin: Plugin | None = None,
              config: dict[str, Any] | None = None, model: str = "gpt-4o", timeout_s: float | None = None,
              scripted: ScriptedProviders | None = None) -> CompletionResult:
    plugin = plugin or Plugin(rng=random.Random(1))
    host = make_host(plugin, DirectQueue(), scripted or ScriptedProviders(*providers),
                     config={"retry": config or {}}, clock=clock, sleep=clock.sleep)
    async with host:
        return await host.complete(CompletionRequest(model, MESSAGES, timeout_s=timeout_s))


async def test_fails_over_before_backing_off(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[RateLimited("429", retry_after=20, provider="a")])
    b = FakeProvider("b", script=["from b"])
    result = await run(make_host, clock, a, b)
    assert result.ok and result.text == "from b" and result.provider == "b"
    assert trail(result) == [(1, "a", "RateLimited", 0.0), (2, "b", None, None)]
    assert clock.sleeps == []  # no wait: neither the backoff nor a's Retry-After applies to b


async def test_backs_off_on_the_last_deployment_with_seeded_jitter(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[ProviderUnavailable("503")])
    b = FakeProvider("b", script=[ProviderTimeout("slow"), ProviderUnavailable("reset"), "from b"])
    result = await run(make_host, clock, a, b, plugin=Plugin(rng=random.Random(5)),
                       config={"base_delay_s": 2, "max_delay_s": 60})
    r = random.Random(5)
    first, second = r.random() * 2, r.random() * 4  # b's 1st and 2nd failures: windows 2 and 4
    assert trail(result) == [
        (1, "a", "ProviderUnavailable", 0.0),
        (2, "b", "ProviderTimeout", first),
        (3, "b", "ProviderUnavailable", second),
        (4, "b", None, None),
    ]
    assert clock.sleeps == [first, second]
    assert len(a.calls) == 1 and len(b.calls) == 3


async def test_retry_after_is_honoured_above_max_delay(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[RateLimited("429", retry_after=7.5), "ok"])
    result = await run(make_host, clock, a, config={"base_delay_s": 0.1, "max_delay_s": 1})
    assert result.ok
    assert trail(result) == [(1, "a", "RateLimited", 7.5), (2, "a", None, None)]
    assert clock.sleeps == [7.5]


async def test_max_attempts_counts_every_deployment(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[ProviderUnavailable("503 from a")])
    b = FakeProvider("b", script=[ProviderUnavailable("503 from b")])
    result = await run(make_host, clock, a, b, config={"max_attempts": 4})
    assert result.status == "error"
    assert [(n, p, e) for n, p, e, _ in trail(result)] == [
        (1, "a", "ProviderUnavailable"), (2, "b", "ProviderUnavailable"),
        (3, "b", "ProviderUnavailable"), (4, "b", "ProviderUnavailable")]
    assert result.attempts[0].delay_s == 0.0 and result.attempts[-1].delay_s is None
    assert result.error == {"type": "ProviderUnavailable",
                            "message": "503 from b (gave up after 4 attempt(s): max_attempts is 4)"}
    assert result.attempts[-1].error_message == "503 from b"
    assert len(clock.sleeps) == 2


async def test_per_model_override(make_host: Any, clock: FakeClock) -> None:
    config = {"max_attempts": 3, "base_delay_s": 0.5, "models": {"gpt-4o*": {"max_attempts": 2}}}
    a = FakeProvider("a", script=[ProviderUnavailable("503")])
    result = await run(make_host, clock, a, config=config, model="gpt-4o-mini")
    assert len(result.attempts) == 2
    assert result.error["message"].endswith("(gave up after 2 attempt(s): max_attempts is 2 for 'gpt-4o*')")
    other = FakeClock()
    result = await run(make_host, other, FakeProvider("a", script=[ProviderUnavailable("503")]), config=config,
                       model="claude-3")
    assert len(result.attempts) == 3


async def test_auth_failed_switches_deployment(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[AuthFailed("401", provider="a")])
    b = FakeProvider("b", script=["from b"])
    result = await run(make_host, clock, a, b)
    assert trail(result) == [(1, "a", "AuthFailed", 0.0), (2, "b", None, None)]


async def test_auth_failed_on_the_last_deployment_is_final(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[ProviderUnavailable("503")])
    b = FakeProvider("b", script=[AuthFailed("401 bad key")])
    result = await run(make_host, clock, a, b)
    assert trail(result) == [(1, "a", "ProviderUnavailable", 0.0), (2, "b", "AuthFailed", None)]
    assert result.error == {"type": "AuthFailed", "message": "401 bad key (not retried: AuthFailed is final for "
                                                             "deployment 'b' and no other deployment of 'gpt-4o' is available)"}
    assert clock.sleeps == []


async def test_final_errors_are_not_retried_anywhere(make_host: Any, clock: FakeClock) -> None:
    for error in (BadRequest("400 bad"), ContextWindowExceeded("too long")):
        a = FakeProvider("a", script=[error])
        b = FakeProvider("b", script=["from b"])
        result = await run(make_host, FakeClock(), a, b)
        assert trail(result) == [(1, "a", type(error).__name__, None)]
        assert result.error == {"type": type(error).__name__, "message": error.message}
        assert b.calls == []


async def test_open_circuit_is_not_a_failover_target(make_host: Any, clock: FakeClock) -> None:
    class WithOpenCircuit(ScriptedProviders):
        @hookimpl
        def ksi_list_providers(self, model: str | None) -> list[ProviderInfo]:
            return [ProviderInfo(p.name, p.model, "fake", state="open" if p.name == "b" else "closed")
                    for p in self.providers]

    a = FakeProvider("a", script=[ProviderUnavailable("503"), "from a"])
    b = FakeProvider("b", script=["from b"])
    result = await run(make_host, clock, scripted=WithOpenCircuit(a, b))
    assert [(n, p) for n, p, _, _ in trail(result)] == [(1, "a"), (2, "a")]
    assert result.attempts[0].delay_s > 0 and b.calls == []


async def test_deadline_is_never_exceeded(make_host: Any, clock: FakeClock) -> None:
    # every call takes 3 fake seconds and fails; the request has 10 seconds in all
    a = TimedProvider("a", clock, latency=3.0, script=[ProviderUnavailable("503")], timeout_s=30)
    result = await run(make_host, clock, a, timeout_s=10,
                       config={"base_delay_s": 1, "max_delay_s": 60, "max_attempts": 100})
    assert result.status == "error"
    assert clock.elapsed <= 10
    assert clock.elapsed == pytest.approx(sum(min(3.0, t) for t in a.timeouts) + sum(clock.sleeps))
    assert result.error["type"] == "DeadlineExceeded"
    assert "10s deadline" in result.error["message"]
    last = result.attempts[-1]
    assert f"last error {last.error_type}: {last.error_message}" in result.error["message"]
    assert all(t <= 10 for t in a.timeouts)


async def test_deadline_with_slow_timeouts_across_deployments(make_host: Any, clock: FakeClock) -> None:
    a = TimedProvider("a", clock, latency=100.0, timeout_s=4)
    b = TimedProvider("b", clock, latency=100.0, timeout_s=4)
    result = await run(make_host, clock, a, b, timeout_s=9, config={"max_attempts": 50, "base_delay_s": 0.5})
    assert result.error["type"] == "DeadlineExceeded"
    assert clock.elapsed <= 9
    assert [p for _, p, _, _ in trail(result)][:2] == ["a", "b"]
    assert {e for _, _, e, _ in trail(result)} == {"ProviderTimeout"}


async def test_retry_after_past_the_deadline_gives_up_at_once(make_host: Any, clock: FakeClock) -> None:
    a = FakeProvider("a", script=[RateLimited("429 slow down", retry_after=30)])
    result = await run(make_host, clock, a, timeout_s=5)
    assert trail(result) == [(1, "a", "RateLimited", None)]
    assert result.error["type"] == "DeadlineExceeded"
    assert "Retry-After" in result.error["message"] and "RateLimited: 429 slow down" in result.error["message"]
    assert clock.sleeps == [] and clock.elapsed == 0


async def test_config_seed_makes_jitter_reproducible(make_host: Any) -> None:
    async def delays(seed: int) -> list[float]:
        clock = FakeClock()
        a = FakeProvider("a", script=[ProviderUnavailable("503")] * 3 + ["ok"])
        result = await run(make_host, clock, a, plugin=Plugin(), config={"seed": seed, "base_delay_s": 1})
        assert result.ok
        return [at.delay_s for at in result.attempts[:-1]]

    r = random.Random(42)
    expected = [r.random() * 1, r.random() * 2, r.random() * 4]
    assert await delays(42) == expected
    assert await delays(42) == expected
    assert await delays(43) != expected


async def test_unknown_operational_error_follows_its_retryable_hint(make_host: Any, clock: FakeClock) -> None:
    from ksi_host.errors import OperationalError

    class Glitch(OperationalError):
        pass

    a = FakeProvider("a", script=[Glitch("glitch", retryable=True), Glitch("glitch"), "ok"])
    result = await run(make_host, clock, a)
    assert [e for _, _, e, _ in trail(result)] == ["Glitch", "Glitch"]
    assert result.error == {"type": "Glitch", "message": "glitch"}
