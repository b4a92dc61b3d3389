"""Shared test helpers: an in-test failure policy and a way to write ledger rows directly."""

from __future__ import annotations

from typing import Any

import ksi_host
from ksi_host.errors import OperationalError, ProviderUnavailable
from ksi_host.models import AttemptContext, CompletionRequest, FailureDecision, UpstreamCall, Usage


class RetryPolicy:
    """A tiny ``ksi_handle_failure``: retry at once up to ``max_attempts``;
    switch provider after a ProviderUnavailable, stay on the same one otherwise."""

    def __init__(self, max_attempts: int = 5) -> None:
        self.max_attempts = max_attempts

    @ksi_host.hookimpl
    def ksi_handle_failure(self, error: OperationalError, attempt: AttemptContext) -> FailureDecision:
        if attempt.number >= self.max_attempts:
            return FailureDecision.give_up(error)
        return FailureDecision.retry(0, switch_provider=isinstance(error, ProviderUnavailable))


def request(**kw: Any) -> CompletionRequest:
    kw.setdefault("model", "m")
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return CompletionRequest(**kw)


async def record(host: Any, req: CompletionRequest, *, attempt: int = 1, provider: str = "p1",
                 usage: Usage = Usage(10, 5, 15, None), created_at: float = 1_700_000_000.0,
                 outcome: str = "ok", latency_ms: float = 12.5) -> UpstreamCall:
    """Record one call through the hook, as the host does, with a chosen timestamp."""
    call = UpstreamCall(req.request_id, attempt, provider, req.model, usage, latency_ms, outcome, created_at)
    await host.hooks.call("ksi_record_usage", host=host, request=req, call=call)
    return call


async def ledger(host: Any) -> list[dict[str, Any]]:
    rows = await host.db.fetchall("SELECT * FROM token_usage ORDER BY id")
    return [dict(r) for r in rows]
