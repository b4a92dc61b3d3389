"""DeploymentProvider: the key, one attempt, and its outcome on the circuit, for every provider plugin."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from ksi_host.errors import AuthFailed, ProviderTimeout, RateLimited
from ksi_host.models import CompletionRequest, ProviderResponse
from ksi_host.providers.circuit import CircuitBreaker
from ksi_host.providers.deployment_provider import DeploymentProvider
from ksi_host.providers.deployments import Deployment

REQUEST = CompletionRequest.from_dict({"model": "m", "prompt": "hi"})


class Scripted(DeploymentProvider):
    log = logging.getLogger("test.deployment_provider")

    def __init__(self, answer: Any, **deployment: Any) -> None:
        super().__init__(Deployment(name="d1", model="m", **deployment), CircuitBreaker(2, 30.0))
        self.answer = answer
        self.seen: list[tuple[float | None, str | None]] = []

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        self.seen.append((timeout_s, key))
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer == "hang":
            await asyncio.sleep(3600)
        return ProviderResponse(self.answer)


async def test_a_success_is_recorded_and_the_key_and_timeout_reach_the_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DP_KEY", "sk-test")
    p = Scripted("hello", api_key_env="TEST_DP_KEY", timeout_s=12.0)
    p.breaker.record_failure()
    assert (await p.complete(REQUEST, timeout_s=None)).text == "hello"
    assert (await p.complete(REQUEST, timeout_s=3.0)).text == "hello"
    assert p.seen == [(12.0, "sk-test"), (3.0, "sk-test")]  # the deployment's timeout unless the host gives less
    assert p.breaker.failures == 0 and repr(p) == "<Scripted d1 model='m' closed>"


async def test_provider_errors_and_timeouts_are_recorded_and_raised() -> None:
    p = Scripted(RateLimited("slow down", retry_after=2.0))
    with pytest.raises(RateLimited) as caught:
        await p.complete(REQUEST, timeout_s=1.0)
    assert caught.value.provider == "d1"  # filled in when the attempt left it out
    p.answer = TimeoutError()
    with pytest.raises(ProviderTimeout, match="d1"):
        await p.complete(REQUEST, timeout_s=1.0)
    assert p.breaker.state == "open" and p.breaker.failures == 2


async def test_an_unset_key_variable_fails_before_the_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_DP_UNSET", raising=False)
    p = Scripted("never", api_key_env="TEST_DP_UNSET")
    with pytest.raises(AuthFailed, match="TEST_DP_UNSET"):
        await p.complete(REQUEST, timeout_s=None)
    assert p.seen == [] and p.breaker.failures == 1


async def test_a_programming_error_passes_through_and_leaves_the_circuit_alone() -> None:
    p = Scripted(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        await p.complete(REQUEST, timeout_s=None)
    assert p.breaker.failures == 0 and p.breaker.state == "closed"


def test_a_subclass_must_write_attempt() -> None:
    class Nothing(DeploymentProvider):
        pass

    with pytest.raises(NotImplementedError, match="Nothing must define attempt"):
        asyncio.run(Nothing(Deployment(name="x", model="m"), CircuitBreaker()).complete(REQUEST, timeout_s=None))
