"""Shared fakes: a clock whose sleep only advances it, and a provider that spends fake time."""

from __future__ import annotations

from typing import Any

from ksi_host.errors import ProviderTimeout
from ksi_host.models import CompletionRequest, ProviderResponse
from ksi_host.testing import FakeProvider


class FakeClock:
    """``host.clock`` and ``host.sleep`` in one: sleeping only moves the time on."""

    def __init__(self, start: float = 1000.0) -> None:
        self.start = start
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    @property
    def elapsed(self) -> float:
        return self.now - self.start


class TimedProvider(FakeProvider):
    """A FakeProvider whose every call takes ``latency`` fake seconds, cut short
    (ProviderTimeout) by the ``timeout_s`` the host passes, as a real one would be."""

    def __init__(self, name: str, clock: FakeClock, latency: float, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.clock = clock
        self.latency = latency
        self.timeouts: list[float | None] = []

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse:
        self.timeouts.append(timeout_s)
        if timeout_s is not None and self.latency > timeout_s:
            self.clock.now += timeout_s
            self.calls.append(request)
            raise ProviderTimeout(f"no answer within {timeout_s:g}s", provider=self.name)
        self.clock.now += self.latency
        return await super().complete(request, timeout_s=timeout_s)
