"""The spans of one request, built when it has finished, from what the observer hooks reported.

Every span is started and ended in one go with explicit times (``start_time=``,
``end(end_time=)``, nanoseconds since the epoch), so no span is ever left open
across an ``await``, and a process that dies leaves nothing half-recorded:

* ``ksi.request {model}`` (INTERNAL): from ``result.started_at`` (the host began
  executing the request) to ``result.finished_at``. Status ERROR unless ok.
  The time before its first upstream call was sent (preparing the request,
  choosing a provider, waiting for admission: rate or budget limits) is its
  ``ksi.wait_ms``, and shows as the gap before the first attempt span.
* ``chat {model}`` (CLIENT), a child per attempt that sent an upstream call:
  from the call's ``created_at`` for its ``latency_ms``.
* An attempt that sent nothing (no provider serves the model, every circuit
  open, refused by admission) is an event ``ksi.attempt.not_sent`` on the
  request span, at the time the host reported it: it made no call, and the
  conventions' ``gen_ai.provider.name`` is required on a call's span.

A request the sampler leaves out (``OTEL_TRACES_SAMPLER``) gets no child spans.
Building a span through the SDK's tracer costs about 20 us (its own work in
``start_span`` and its checks of every attribute), so each span carries only
what the README's tables list.

This module imports the OpenTelemetry API: :mod:`ksi_otel.plugin` imports it at start-up only.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ksi_host import Attempt, CompletionRequest, CompletionResult, UpstreamCall
from ksi_host.models import OUTCOME_UNKNOWN

from . import content

OPERATION = "chat"


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _between(t: int, low: int, high: int) -> int:
    return low if t < low else high if t > high else t


def _common(request: CompletionRequest) -> dict[str, Any]:
    """The attributes every attempt span of ``request`` has: the session and the sampling parameters it sets."""
    found: dict[str, Any] = {}
    if request.session_id is not None:
        found["gen_ai.conversation.id"] = request.session_id
    max_tokens = request.max_tokens if request.max_tokens is not None else request.max_completion_tokens
    for key, value in (("gen_ai.request.max_tokens", max_tokens), ("gen_ai.request.temperature", request.temperature),
                       ("gen_ai.request.top_p", request.top_p), ("gen_ai.request.seed", request.seed),
                       ("gen_ai.request.frequency_penalty", request.frequency_penalty),
                       ("gen_ai.request.presence_penalty", request.presence_penalty)):
        if value is not None:
            found[key] = value
    if request.stop is not None:
        found["gen_ai.request.stop_sequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    return found


def _request_attributes(request: CompletionRequest, result: CompletionResult) -> dict[str, Any]:
    a: dict[str, Any] = {"gen_ai.request.model": request.model, "ksi.request_id": request.request_id,
                         "ksi.priority": request.priority, "ksi.status": result.status, "ksi.attempts": len(result.attempts)}
    for key, value in (("gen_ai.conversation.id", request.session_id), ("ksi.agent_id", request.agent_id),
                       ("ksi.originator_agent_id", request.originator_agent_id), ("ksi.purpose", request.purpose),
                       ("ksi.provider", result.provider)):
        if value is not None:
            a[key] = value
    if result.error is not None:
        a["error.type"] = result.error.get("type") or "_OTHER"
    return a


def _call_attributes(attempt: Attempt, call: UpstreamCall, common: dict[str, Any]) -> dict[str, Any]:
    a = {"gen_ai.operation.name": OPERATION, "gen_ai.provider.name": call.provider, "gen_ai.request.model": call.model,
         **common, "ksi.attempt": attempt.number}
    if call.outcome == OUTCOME_UNKNOWN:  # sent, and nobody saw how it ended (a timeout, a cancel): it may be billed
        a["ksi.call.outcome"] = call.outcome
    usage = call.usage
    if usage is not None:
        a["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        a["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if usage.cached_tokens is not None:
            a["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
        if usage.reasoning_tokens is not None:
            a["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
        if usage.cost_usd is not None:
            a["ksi.usage.cost_usd"] = usage.cost_usd
    if attempt.error_type is not None:
        a["error.type"] = attempt.error_type
    if attempt.delay_s is not None:
        a["ksi.retry.delay_s"] = attempt.delay_s
    if attempt.ttft_ms is not None:
        a["ksi.ttft_ms"] = attempt.ttft_ms
    return a


class SpanWriter:
    """Writes the spans of finished requests to ``tracer``. ``record_content``: messages go on the attempt spans."""

    def __init__(self, tracer: Any, record_content: bool) -> None:
        self.tracer = tracer
        self.record_content = record_content

    def request(self, request: CompletionRequest, result: CompletionResult,
                finished: list[tuple[Attempt, UpstreamCall | None, int]]) -> Any:
        """Write the request span and its children; return the (ended) request span.

        ``finished``: the request's attempts as ``ksi_attempt_finished`` reported them, each with the
        time it was reported (ns)."""
        now = time.time_ns()
        start = _ns(result.started_at) if result.started_at is not None else now
        end = max(start, _ns(result.finished_at) if result.finished_at is not None else now)
        attributes = _request_attributes(request, result)
        first = next((call for _, call, _ in finished if call is not None), None)
        if first is not None:
            wait_end = _between(_ns(first.created_at), start, end)
            attributes["ksi.wait_ms"] = (wait_end - start) / 1e6
        span = self.tracer.start_span(f"ksi.request {request.model}", kind=SpanKind.INTERNAL, attributes=attributes,
                                      start_time=start)
        if not span.is_recording():  # sampled out: its children would be too
            return span
        parent = trace.set_span_in_context(span)
        common = _common(request)
        for attempt, call, reported_at in finished:
            if call is None:
                span.add_event("ksi.attempt.not_sent", _not_sent(attempt), timestamp=_between(reported_at, start, end))
            else:
                self._attempt(parent, request, result, attempt, call, common, (start, end))
        if result.status != "ok":
            span.set_status(Status(StatusCode.ERROR, (result.error or {}).get("message")))
        span.end(end_time=end)
        return span

    def late_attempt(self, request_span: Any, request: CompletionRequest, attempt: Attempt, call: UpstreamCall | None) -> None:
        """An attempt reported after its request's spans were written (the attempt a cancel cut short): its
        span, under the request span it belongs to (past that span's end). One that sent nothing leaves none."""
        if call is not None:
            self._attempt(trace.set_span_in_context(request_span), request, None, attempt, call, _common(request), None)

    def _attempt(self, parent: Any, request: CompletionRequest, result: CompletionResult | None, attempt: Attempt,
                 call: UpstreamCall, common: dict[str, Any], bounds: tuple[int, int] | None) -> None:
        start = _ns(call.created_at)
        end = start + int((attempt.latency_ms or 0.0) * 1_000_000)
        if bounds is not None:  # inside the request span (the host's clocks may disagree by microseconds)
            start, end = _between(start, *bounds), _between(end, *bounds)
        attributes = _call_attributes(attempt, call, common)
        answered = result is not None and attempt.error_type is None and result.ok
        if answered:
            if result.model is not None:
                attributes["gen_ai.response.model"] = result.model
            if result.finish_reason is not None:
                attributes["gen_ai.response.finish_reasons"] = [result.finish_reason]
        if self.record_content:
            attributes["gen_ai.input.messages"] = content.input_messages(request.messages)
            if answered and result.message is not None:
                attributes["gen_ai.output.messages"] = content.output_messages(result.message, result.finish_reason)
        span = self.tracer.start_span(f"{OPERATION} {call.model}", parent, kind=SpanKind.CLIENT, attributes=attributes,
                                      start_time=start)
        if attempt.ttft_ms is not None:
            span.add_event("ksi.first_chunk", timestamp=start + int(attempt.ttft_ms * 1_000_000))
        if attempt.error_type is not None:
            span.set_status(Status(StatusCode.ERROR, attempt.error_message))
        span.end(end_time=end)


def _not_sent(attempt: Attempt) -> dict[str, Any]:
    a: dict[str, Any] = {"ksi.attempt": attempt.number}
    if attempt.provider is not None:
        a["ksi.provider"] = attempt.provider
    if attempt.error_type is not None:
        a["error.type"] = attempt.error_type
    if attempt.error_message is not None:
        a["ksi.error.message"] = attempt.error_message
    if attempt.delay_s is not None:
        a["ksi.retry.delay_s"] = attempt.delay_s
    return a
