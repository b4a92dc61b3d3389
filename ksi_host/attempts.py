"""One attempt of a request, step by step: what :meth:`ksi_host.Host.execute` repeats.

:meth:`AttemptRunner.run` selects a provider (asking provider plugins in the
host's order, :mod:`ksi_host.ranking`), waits for admission (``ksi_admit``),
records the call before it is sent (``ksi_attempt_started``), makes the one
upstream call and records how it ended (``ksi_record_usage``).
:meth:`AttemptRunner.decide` asks the failure policy (``ksi_handle_failure``)
what a failed attempt becomes, within the request's deadline;
:meth:`AttemptRunner.finished` tells the observers (``ksi_attempt_finished``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import attrs

from . import hookspecs
from .errors import (
    BadRequest,
    BudgetExceeded,
    Cancelled,
    DatabaseError,
    DeadlineExceeded,
    MissingPluginError,
    NoProviderError,
    OperationalError,
    ProviderTimeout,
    ProviderUnavailable,
    ValidationError,
)
from .models import (
    OUTCOME_OK,
    OUTCOME_UNKNOWN,
    Attempt,
    AttemptContext,
    CompletionRequest,
    FailureDecision,
    Provider,
    ProviderResponse,
    UpstreamCall,
    Usage,
)
from .ranking import ProviderRanking
from .streaming import Assembly, StreamSink, call_complete, call_prepare, stream_once

if TYPE_CHECKING:
    from .service import Host

_NO_EXCLUDE: frozenset[str] = frozenset()
log = logging.getLogger("ksi_host")


class AttemptRunner:
    """The steps of one attempt, for one :class:`~ksi_host.Host`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.ranking = ProviderRanking(host.hooks, host)
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, request: CompletionRequest, number: int, excluded: set[str], deadline: float | None,
                  history: list[Attempt]) -> _Run:
        """One attempt: select, admit, record the call, call the provider, record how it ended. One cancelled
        is appended to ``history`` (the caller appends the others, once it has decided what they become)."""
        run = _Run()
        t0 = self.host.clock()
        call: UpstreamCall | None = None
        try:
            provider = await self._select(request, excluded)
            run.provider = provider.name
            await self._admit(request, provider, number, deadline)
            await call_prepare(provider)  # a lazy import (litellm's: seconds) is not the attempt's time or latency
            timeout = provider.timeout_s
            t0 = self.host.clock()
            if deadline is not None:
                if deadline <= t0:
                    raise DeadlineExceeded(f"the {request.timeout_s}s deadline passed before attempt {number}")
                timeout = deadline - t0 if timeout is None else min(timeout, deadline - t0)
            call = UpstreamCall(request.request_id, number, provider.name, request.model)
            if self.host.hooks.implemented("ksi_attempt_started"):
                await self.host.hooks.call("ksi_attempt_started", host=self.host, request=request, call=call)
            sink = self.host.streams.get(request.request_id)
            if sink is None:
                run.response = await call_complete(provider, request, timeout)
            else:
                run.response, run.ttft_ms, run.assembly = await self._stream(provider, request, timeout, sink, deadline)
        except DatabaseError:  # the ledger's row (or a plugin's table) could not be written: no attempt's outcome, and
            raise  # no result either; the queue keeps the request stored unfinished (it runs again at the next start)
        except OperationalError as e:
            run.error = e
            run.assembly = getattr(e, "assembly", None)
        except asyncio.CancelledError:
            history.append(self._cut_short(request, number, run, call, (self.host.clock() - t0) * 1000))
            raise
        run.latency_ms = (self.host.clock() - t0) * 1000
        run.usage = run.response.usage if run.response is not None else getattr(run.error, "usage", None)
        if call is not None:
            outcome = (OUTCOME_OK if run.error is None
                       else OUTCOME_UNKNOWN if isinstance(run.error, ProviderTimeout) and run.usage is None  # no answer seen
                       else run.error.type)
            run.call = attrs.evolve(call, usage=run.usage, latency_ms=run.latency_ms, outcome=outcome)
            if self.host.hooks.implemented("ksi_record_usage"):
                await self.host.hooks.call("ksi_record_usage", host=self.host, request=request, call=run.call)
        return run

    async def _select(self, request: CompletionRequest, excluded: set[str]) -> Provider:
        """Ask provider plugins in the host's order (see :mod:`ksi_host.ranking`) until one answers."""
        ranked = await self.ranking.of(request.model)
        if not ranked.order:
            raise MissingPluginError("ksi_select_provider", hookspecs.INSTALL_HINTS["ksi_select_provider"])
        unable = ranked.unable(request.needs()) if ranked.limited else {}  # (needs: ~3 us, only where it matters)
        exclude = frozenset(excluded | unable.keys()) if excluded or unable else _NO_EXCLUDE
        args = {"host": self.host, "request": request, "exclude": exclude}
        blocked: ProviderUnavailable | None = None
        for impl in ranked.order:
            try:
                provider = await self.host.hooks.call_impl(impl, "ksi_select_provider", args)
            except ProviderUnavailable as e:  # its deployments are all behind open circuits: ask the next plugin
                if blocked is None or (e.retry_after or 0) < (blocked.retry_after or 0):
                    blocked = e
                continue
            if provider is not None:
                return provider
        if blocked is not None:
            raise blocked
        if unable and not set(ranked.supports) - unable.keys() - excluded:  # the request asks what none can do
            raise BadRequest("; ".join(f"{', '.join(lacks)} not supported by {name}" for name, lacks in sorted(unable.items()))
                             + " (nothing was sent)")
        raise await self._no_provider(request, excluded)

    async def _admit(self, request: CompletionRequest, provider: Provider, number: int, deadline: float | None) -> None:
        """``ksi_admit``: wait until every admitting plugin lets the attempt go, never past the deadline."""
        if not self.host.hooks.implemented("ksi_admit"):
            return
        admitted = self.host.hooks.call("ksi_admit", host=self.host, request=request, provider=provider, attempt=number)
        if deadline is None:
            await admitted
            return
        try:
            async with asyncio.timeout(max(0.0, deadline - self.host.clock())):
                await admitted
        except TimeoutError:
            raise DeadlineExceeded(f"the {request.timeout_s}s deadline passed while attempt {number} waited "
                                   f"for admission to {provider.name}") from None

    async def _stream(self, provider: Provider, request: CompletionRequest, timeout: float | None, sink: StreamSink,
                      deadline: float | None) -> tuple[ProviderResponse, float | None, Assembly]:
        """A streamed attempt (:func:`ksi_host.streaming.stream_once`), cut at the request's deadline."""
        if deadline is None:
            return await stream_once(provider, request, timeout, sink, self.host.clock)
        try:
            async with asyncio.timeout(max(0.0, deadline - self.host.clock())):
                return await stream_once(provider, request, timeout, sink, self.host.clock)
        except TimeoutError:
            raise DeadlineExceeded(f"the {request.timeout_s}s deadline passed while {provider.name} was streaming",
                                   provider=provider.name) from None

    async def finished(self, request: CompletionRequest, attempt: Attempt, error: OperationalError | None,
                       call: UpstreamCall | None) -> None:
        """``ksi_attempt_finished``: tell the observers."""
        if self.host.hooks.implemented("ksi_attempt_finished"):
            await self.host.hooks.notify("ksi_attempt_finished", host=self.host, request=request, attempt=attempt,
                                         error=error, call=call)

    def _cut_short(self, request: CompletionRequest, number: int, run: _Run, call: UpstreamCall | None,
                   latency_ms: float) -> Attempt:
        """An attempt was cancelled (ksi_cancel, shut-down): record its call as of unknown outcome and tell
        the observers, in the background (the cancel goes on now; ``stop`` waits for these). Returns the attempt."""
        error = Cancelled(f"attempt {number} was cancelled while in progress")
        attempt = Attempt(number, run.provider, error.type, error.message, None, latency_ms)
        ended = None if call is None else attrs.evolve(call, latency_ms=latency_ms, outcome=OUTCOME_UNKNOWN)

        async def report() -> None:
            if ended is not None and self.host.hooks.implemented("ksi_record_usage"):
                await self.host.hooks.call("ksi_record_usage", host=self.host, request=request, call=ended)
            await self.finished(request, attempt, error, ended)

        task = asyncio.ensure_future(report())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return attempt

    async def drain(self) -> None:
        """Wait for the reports of attempts cut short (the host calls this before closing its database). A
        report that failed operationally (the database full, say) is logged; a programming error propagates."""
        while self._background:
            for outcome in await asyncio.gather(*self._background, return_exceptions=True):
                if isinstance(outcome, OperationalError):
                    log.warning("the record of an attempt cut short was lost: %s: %s", outcome.type, outcome.message)
                elif isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                    raise outcome

    async def decide(self, request: CompletionRequest, error: OperationalError, number: int, run: _Run,
                     started: float, deadline: float | None, history: list[Attempt], excluded: set[str]) -> FailureDecision:
        """What the failed attempt ``run`` becomes: ``ksi_handle_failure``'s decision, within the deadline."""
        if run.streamed:  # pieces were handed out: the consumer has them, no other attempt can take them back
            return FailureDecision.give_up(error)
        if isinstance(error, (MissingPluginError, NoProviderError, ValidationError, BudgetExceeded, DeadlineExceeded)):
            return FailureDecision.give_up(error)  # final by nature: no policy is asked
        name = run.provider
        if not self.host.hooks.implemented("ksi_handle_failure"):
            if error.retryable:
                error.message += f" (not retried: {MissingPluginError('ksi_handle_failure', hookspecs.INSTALL_HINTS['ksi_handle_failure'])})"
            return FailureDecision.give_up(error)
        ctx = AttemptContext(number, name, started, self.host.clock(), deadline, tuple(history), frozenset(excluded))
        decision = await self.host.hooks.first("ksi_handle_failure", host=self.host, request=request, error=error, attempt=ctx)
        if decision is None:
            return FailureDecision.give_up(error)
        if decision.action == "retry" and deadline is not None and self.host.clock() + decision.delay_s >= deadline:
            return FailureDecision.give_up(DeadlineExceeded(
                f"gave up after {number} attempt(s): waiting {decision.delay_s:.2f}s more would pass the "
                f"{request.timeout_s}s deadline (last error {error.type}: {error.message})"))
        return decision

    async def _no_provider(self, request: CompletionRequest, excluded: set[str]) -> NoProviderError:
        if excluded:
            return NoProviderError(f"no provider left for model {request.model!r}: {', '.join(sorted(excluded))} failed")
        known = sorted({p.model for p in await self.host.providers(None)})
        return NoProviderError(f"no provider serves model {request.model!r} (configured models: {', '.join(known) or 'none'})")


@attrs.define
class _Run:
    """What one attempt came to (see :meth:`Host._attempt`)."""

    provider: str | None = None
    response: ProviderResponse | None = None
    error: OperationalError | None = None
    latency_ms: float = 0.0
    usage: Usage | None = None
    call: UpstreamCall | None = None  # the upstream call as it ended; None when nothing was sent
    ttft_ms: float | None = None  # streamed: to the first piece
    assembly: Assembly | None = None  # streamed: what was handed out to the consumer

    @property
    def streamed(self) -> bool:
        """Did this attempt hand out a piece? (Then it cannot be retried: the consumer has it.)"""
        return self.assembly is not None and bool(self.assembly.text or self.assembly.calls or self.assembly.finish_reason)
