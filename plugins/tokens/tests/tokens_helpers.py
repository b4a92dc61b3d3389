"""Shared test helpers: an in-test failure policy and ways to write ledger rows through the hooks directly."""

from __future__ import annotations

from typing import Any

import attrs

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
                 usage: Usage | None = Usage(10, 5, 15, None), created_at: float = 1_700_000_000.0,
                 outcome: str = "ok", latency_ms: float = 12.5, call_id: str | None = None) -> UpstreamCall:
    """Record how one call ended through the hook, as the host does, with a chosen timestamp
    (``call_id``: the call :func:`start` recorded; None: a new call, its start not recorded)."""
    call = UpstreamCall(req.request_id, attempt, provider, req.model, usage, latency_ms, outcome, created_at)
    if call_id is not None:
        call = attrs.evolve(call, call_id=call_id)
    await host.hooks.call("ksi_record_usage", host=host, request=req, call=call)
    return call


async def start(host: Any, req: CompletionRequest, *, attempt: int = 1, provider: str = "p1",
                created_at: float = 1_700_000_000.0) -> UpstreamCall:
    """Record that a call is about to be sent (``ksi_attempt_started``), as the host does; nothing ends it."""
    call = UpstreamCall(req.request_id, attempt, provider, req.model, created_at=created_at)
    await host.hooks.call("ksi_attempt_started", host=host, request=req, call=call)
    return call


async def ledger(host: Any) -> list[dict[str, Any]]:
    rows = await host.db.fetchall("SELECT * FROM token_usage ORDER BY id")
    return [dict(r) for r in rows]
