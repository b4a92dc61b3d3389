"""Small stand-in plugins for testing one plugin without the others.

* :class:`DirectQueue` implements ``ksi_enqueue`` by running the request at
  once (no storage, no ordering): enough to test a provider, retry or usage
  plugin through ``host.complete``.
* :class:`FakeStreamingProvider` streams: each script item is a list of
  pieces (strings, ChatDelta, exceptions to raise, or awaitables to wait on).
* :class:`ScriptedProviders` implements ``ksi_select_provider`` and
  ``ksi_list_providers`` with :class:`FakeProvider` deployments whose answers
  are scripted: a string (the text), a ProviderResponse, or an exception to raise.
* :class:`FakeClock` is a monotonic clock the test moves by hand
  (``Host(clock=...)``, or a provider plugin's circuit breakers).
* :class:`FailOver` implements ``ksi_handle_failure`` as the smallest failure
  policy that exercises fail-over: retryable errors and AuthFailed move to
  another deployment at once, anything else gives up.
* :class:`UsageCalls` keeps every upstream call ``ksi_record_usage`` reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from ..errors import OperationalError
from ..hookspecs import hookimpl
from ..models import (
    AttemptContext,
    ChatDelta,
    CompletionRequest,
    FailureDecision,
    ProviderInfo,
    ProviderResponse,
    Ticket,
    UpstreamCall,
    Usage,
)


class DirectQueue:
    """``ksi_enqueue`` that runs each request immediately in a task."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    @hookimpl
    def ksi_enqueue(self, host: Any, request: CompletionRequest) -> Ticket:
        ticket = Ticket(request.request_id)

        async def run() -> None:
            try:
                ticket.set_result(await host.execute(request))
            except BaseException as e:  # programming errors reach the caller
                ticket.set_exception(e)

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return ticket


class FakeProvider:
    """A deployment whose answers come from ``script`` in order (the last repeats).

    Each item: a string (answered as text with ``usage``), a ProviderResponse,
    an exception instance (raised), or a coroutine function ``f(request)``.
    ``calls`` lists the requests it received.
    """

    def __init__(self, name: str, model: str = "*", script: Iterable[Any] = ("ok",),
                 usage: Usage | None = Usage(10, 5, 15, None), timeout_s: float | None = 30.0) -> None:
        self.name = name
        self.model = model
        self.script = list(script)
        self.usage = usage
        self.timeout_s = timeout_s
        self.calls: list[CompletionRequest] = []

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse:
        item = self.script[min(len(self.calls), len(self.script) - 1)]
        self.calls.append(request)
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            item = await item(request)
        if isinstance(item, ProviderResponse):
            return item
        return ProviderResponse(text=str(item), usage=self.usage)


class FakeStreamingProvider(FakeProvider):
    """A deployment that streams: each script item (in order, the last repeats) is one call's pieces.

    A piece is a string (content), a ChatDelta, an exception (raised there), or an awaitable (waited
    on: the stream pauses until it is done). Unless a ChatDelta among them has a ``finish_reason``, the
    call ends with one whose finish reason is ``stop`` and whose usage is ``usage``; end a script with
    ``CUT`` to stop without one (an upstream that closes mid-stream). ``closed`` counts streams that
    were closed before their end (the consumer went away).
    """

    CUT = object()

    def __init__(self, name: str, model: str = "*", script: Iterable[Any] = (("ok",),), **kw: Any) -> None:
        super().__init__(name, model, script, **kw)
        self.closed = 0

    async def stream(self, request: CompletionRequest, *, timeout_s: float | None) -> Any:
        pieces = self.script[min(len(self.calls), len(self.script) - 1)]
        self.calls.append(request)
        if isinstance(pieces, BaseException):
            raise pieces
        finished = False
        try:
            for piece in pieces:
                if piece is self.CUT:
                    return
                if isinstance(piece, BaseException):
                    raise piece
                if hasattr(piece, "__await__"):
                    await piece
                    continue
                delta = piece if isinstance(piece, ChatDelta) else ChatDelta(content=str(piece))
                finished = finished or delta.finish_reason is not None
                yield delta
            if not finished:
                yield ChatDelta(finish_reason="stop", usage=self.usage)
        except (GeneratorExit, asyncio.CancelledError):  # stopped by the host before the end: the call is closed
            self.closed += 1
            raise


class ScriptedProviders:
    """Selects the first FakeProvider (in list order) whose model pattern matches and is not excluded."""

    def __init__(self, *providers: FakeProvider) -> None:
        self.providers = list(providers)

    @hookimpl
    def ksi_select_provider(self, request: CompletionRequest, exclude: frozenset[str]) -> FakeProvider | None:
        for p in self.providers:
            if p.name not in exclude and fnmatchcase(request.model, p.model):
                return p
        return None

    @hookimpl
    def ksi_list_providers(self, model: str | None) -> list[ProviderInfo]:
        return [ProviderInfo(p.name, p.model, "fake") for p in self.providers
                if model is None or fnmatchcase(model, p.model)]


class FakeClock:
    """A monotonic clock the test moves by hand: ``clock()`` is ``clock.t``; ``clock.advance(s)``."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class FailOver:
    """A tiny failure policy: retryable errors and AuthFailed move to another deployment at once; the rest give up.

    At most ``max_attempts`` attempts; ``seen`` lists ``(provider, error type)`` of every failure handled.
    """

    def __init__(self, max_attempts: int = 5) -> None:
        self.max_attempts = max_attempts
        self.seen: list[tuple[str | None, str]] = []

    @hookimpl
    def ksi_handle_failure(self, error: OperationalError, attempt: AttemptContext) -> FailureDecision:
        self.seen.append((attempt.provider, error.type))
        if attempt.number < self.max_attempts and (error.retryable or error.type == "AuthFailed"):
            return FailureDecision.retry(0.0, switch_provider=attempt.provider is not None)
        return FailureDecision.give_up(error)


class UsageCalls:
    """An observer plugin: every upstream call (:class:`~ksi_host.models.UpstreamCall`) ``ksi_record_usage``
    reports, in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []

    @hookimpl
    def ksi_record_usage(self, call: UpstreamCall) -> None:
        self.calls.append(call)
