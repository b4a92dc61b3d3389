"""The spans of requests run through a real Host (testing kit plugins), read back from an in-memory exporter."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import Spans
from opentelemetry.trace import SpanKind, StatusCode

from ksi_host import (
    BudgetExceeded,
    Cancelled,
    ChatDelta,
    CompletionResult,
    ProviderResponse,
    ProviderUnavailable,
    RateLimited,
    Ticket,
    Usage,
    hookimpl,
)
from ksi_host.testing import DirectQueue, FailOver, FakeProvider, FakeStreamingProvider, ScriptedProviders

REQUEST = {"model": "gpt-test", "prompt": "hello", "session_id": "s1", "agent_id": "planner",
           "originator_agent_id": "boss", "purpose": "triage", "priority": "high", "max_tokens": 50, "temperature": 0.2}


async def test_an_ok_request_with_one_attempt(otel_host: Any, spans: Spans) -> None:
    answer = ProviderResponse("hi there", usage=Usage(11, 4, 15, 0.002, cached_tokens=3), model="gpt-test-0613",
                              finish_reason="stop")
    async with otel_host(ScriptedProviders(FakeProvider("oa-main", script=[answer]))) as host:
        result = await host.complete({**REQUEST, "request_id": "r-ok"})
    assert result.ok

    request, (attempt,) = spans.request(), spans.attempts()
    assert len(spans.all()) == 2
    assert request.name == "ksi.request gpt-test" and request.kind == SpanKind.INTERNAL
    assert dict(request.attributes) == {
        "gen_ai.request.model": "gpt-test", "gen_ai.conversation.id": "s1", "ksi.request_id": "r-ok",
        "ksi.agent_id": "planner", "ksi.originator_agent_id": "boss", "ksi.purpose": "triage", "ksi.priority": "high",
        "ksi.status": "ok", "ksi.attempts": 1, "ksi.provider": "oa-main", "ksi.wait_ms": request.attributes["ksi.wait_ms"],
    }
    assert request.status.status_code == StatusCode.UNSET

    assert attempt.name == "chat gpt-test" and attempt.kind == SpanKind.CLIENT
    assert dict(attempt.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "oa-main", "gen_ai.request.model": "gpt-test",
        "gen_ai.response.model": "gpt-test-0613", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.conversation.id": "s1", "gen_ai.request.max_tokens": 50, "gen_ai.request.temperature": 0.2,
        "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 4, "gen_ai.usage.cache_read.input_tokens": 3,
        "ksi.usage.cost_usd": 0.002, "ksi.attempt": 1,
    }
    assert attempt.status.status_code == StatusCode.UNSET
    assert attempt.parent is not None and attempt.parent.span_id == request.context.span_id
    assert attempt.context.trace_id == request.context.trace_id and request.parent is None


async def test_a_request_that_failed_over_has_two_attempt_spans(otel_host: Any, spans: Spans) -> None:
    down = ProviderUnavailable("503 from upstream", provider="a", usage=Usage(7, 0, 7))
    providers = ScriptedProviders(FakeProvider("a", script=[down]), FakeProvider("b"))
    async with otel_host(providers, FailOver()) as host:
        result = await host.complete({"model": "m", "prompt": "hi"})
    assert result.ok and [a.provider for a in result.attempts] == ["a", "b"]

    first, second = spans.attempts()
    assert first.attributes["gen_ai.provider.name"] == "a" and first.attributes["ksi.attempt"] == 1
    assert first.attributes["error.type"] == "ProviderUnavailable"
    assert first.status.status_code == StatusCode.ERROR and first.status.description == "503 from upstream"
    assert first.attributes["ksi.retry.delay_s"] == 0.0
    assert first.attributes["gen_ai.usage.input_tokens"] == 7  # the failed call reported usage
    assert "gen_ai.response.model" not in first.attributes and "gen_ai.response.finish_reasons" not in first.attributes
    assert second.attributes["gen_ai.provider.name"] == "b" and "error.type" not in second.attributes
    assert second.status.status_code == StatusCode.UNSET and second.attributes["gen_ai.response.model"] == "m"
    assert first.end_time <= second.start_time
    request = spans.request()
    assert request.attributes["ksi.attempts"] == 2 and request.attributes["ksi.provider"] == "b"
    assert request.status.status_code == StatusCode.UNSET and "error.type" not in request.attributes


async def test_a_request_nothing_serves_is_an_error_request_span_with_no_attempt_span(otel_host: Any, spans: Spans) -> None:
    async with otel_host(ScriptedProviders(FakeProvider("a", model="gpt-*"))) as host:
        result = await host.complete({"model": "claude-x", "prompt": "hi", "session_id": "s9"})
    assert result.status == "error" and result.error["type"] == "NoProviderError"

    assert spans.attempts() == []
    request = spans.request()
    assert request.status.status_code == StatusCode.ERROR
    assert "no provider serves model 'claude-x'" in request.status.description
    assert request.attributes["error.type"] == "NoProviderError" and request.attributes["ksi.status"] == "error"
    assert request.attributes["gen_ai.conversation.id"] == "s9" and "ksi.wait_ms" not in request.attributes
    (event,) = request.events  # the attempt that sent nothing
    assert event.name == "ksi.attempt.not_sent"
    assert dict(event.attributes) == {"ksi.attempt": 1, "error.type": "NoProviderError",
                                      "ksi.error.message": result.error["message"]}
    assert request.start_time <= event.timestamp <= request.end_time


async def test_an_attempt_refused_by_admission_then_served_is_an_event_then_a_span(otel_host: Any, spans: Spans) -> None:
    class RefuseOnce:
        refused = False

        @hookimpl
        def ksi_admit(self, provider: Any, attempt: int) -> None:
            if not self.refused:
                self.refused = True
                raise RateLimited("local window full", retry_after=0.0)

    async with otel_host(ScriptedProviders(FakeProvider("a"), FakeProvider("b")), FailOver(), RefuseOnce()) as host:
        result = await host.complete({"model": "m", "prompt": "hi"})
    assert result.ok and [a.provider for a in result.attempts] == ["a", "b"]

    (event,) = spans.request().events
    assert dict(event.attributes) == {"ksi.attempt": 1, "ksi.provider": "a", "error.type": "RateLimited",
                                      "ksi.error.message": "local window full", "ksi.retry.delay_s": 0.0}
    (attempt,) = spans.attempts()
    assert attempt.attributes["ksi.attempt"] == 2 and attempt.attributes["gen_ai.provider.name"] == "b"
    assert attempt.start_time >= event.timestamp


async def test_a_request_refused_before_any_attempt_has_a_request_span_only(otel_host: Any, spans: Spans) -> None:
    class Broke:
        @hookimpl
        def ksi_prepare_request(self, request: Any) -> None:
            raise BudgetExceeded("agent planner is over its budget")

    async with otel_host(ScriptedProviders(FakeProvider("a")), Broke()) as host:
        result = await host.complete(REQUEST)
    assert result.status == "error"
    request = spans.request()
    assert len(spans.all()) == 1 and request.events == ()
    assert request.attributes["error.type"] == "BudgetExceeded" and request.attributes["ksi.attempts"] == 0
    assert request.status.description == "agent planner is over its budget"


async def test_a_streamed_request_shows_its_time_to_first_chunk(otel_host: Any, spans: Spans) -> None:
    provider = FakeStreamingProvider("st", script=[[asyncio.sleep(0.03), "Hel", "lo",
                                                    ChatDelta(finish_reason="stop", usage=Usage(3, 2, 5))]])
    async with otel_host(ScriptedProviders(provider)) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        pieces = [d.content async for d in stream if d.content]
    assert pieces == ["Hel", "lo"] and stream.result is not None and stream.result.ok

    (attempt,) = spans.attempts()
    ttft_ms = stream.result.attempts[0].ttft_ms
    assert ttft_ms is not None and ttft_ms >= 30
    assert attempt.attributes["ksi.ttft_ms"] == ttft_ms
    (first_chunk,) = attempt.events
    assert first_chunk.name == "ksi.first_chunk"
    assert first_chunk.timestamp == attempt.start_time + int(ttft_ms * 1_000_000)
    assert attempt.start_time < first_chunk.timestamp <= attempt.end_time
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ("stop",)


async def test_content_is_not_recorded_by_default(otel_host: Any, spans: Spans) -> None:
    async with otel_host(ScriptedProviders(FakeProvider("a", script=["the secret answer"]))) as host:
        await host.complete({"model": "m", "prompt": "the secret question"})
    for span in spans.all():
        assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for k in span.attributes)
        assert "secret" not in json.dumps(dict(span.attributes)) + json.dumps([dict(e.attributes) for e in span.events])


async def test_content_is_recorded_when_configured(otel_host: Any, spans: Spans) -> None:
    tool_call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    answer = ProviderResponse("", usage=Usage(9, 3, 12), tool_calls=[tool_call], finish_reason="tool_calls")
    down = ProviderUnavailable("down", provider="a")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "image_url", "image_url": {"url": "https://example.test/sky.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy"},
    ]
    providers = ScriptedProviders(FakeProvider("a", script=[down]), FakeProvider("b", script=[answer]))
    async with otel_host(providers, FailOver(), otel={"record_content": True}) as host:
        result = await host.complete({"model": "m", "messages": messages})
    assert result.ok

    first, second = spans.attempts()
    expected_input = [
        {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather?"},
                                   {"type": "image_url", "image_url": {"url": "https://example.test/sky.png"}}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "rainy"}]},
    ]
    for span in (first, second):  # every attempt sent the messages
        assert json.loads(span.attributes["gen_ai.input.messages"]) == expected_input
    assert "gen_ai.output.messages" not in first.attributes  # it failed: no answer
    assert json.loads(second.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "weather", "arguments": {"city": "Paris"}}],
         "finish_reason": "tool_calls"}]
    assert not any(k.startswith("gen_ai.input") for k in spans.request().attributes)


async def test_spans_nest_and_their_times_are_the_calls_times(otel_host: Any, spans: Spans) -> None:
    async def slow(request: Any) -> ProviderResponse:
        await asyncio.sleep(0.05)
        return ProviderResponse("late", usage=Usage(1, 1, 2))

    providers = ScriptedProviders(FakeProvider("a", script=[RateLimited("429", retry_after=0.0)]), FakeProvider("b", script=[slow]))
    async with otel_host(providers, FailOver()) as host:
        result = await host.complete({"model": "m", "prompt": "hi"})
    assert result.ok

    request = spans.request()
    first, second = spans.attempts()
    assert request.start_time == int(result.started_at * 1e9) and request.end_time == int(result.finished_at * 1e9)
    for attempt, reported in zip((first, second), result.attempts, strict=True):
        assert attempt.parent.span_id == request.context.span_id and attempt.context.trace_id == request.context.trace_id
        assert request.start_time <= attempt.start_time <= attempt.end_time <= request.end_time
        assert abs((attempt.end_time - attempt.start_time) / 1e6 - reported.latency_ms) < 0.01
    assert (second.end_time - second.start_time) / 1e6 >= 50  # the slow call
    assert first.end_time <= second.start_time
    assert request.attributes["ksi.wait_ms"] == (first.start_time - request.start_time) / 1e6


async def test_the_wait_before_the_first_attempt_is_visible(otel_host: Any, spans: Spans) -> None:
    class SlowAdmission:
        @hookimpl
        async def ksi_admit(self, attempt: int) -> None:
            await asyncio.sleep(0.04)  # a rate limiter holding the request back

    async with otel_host(ScriptedProviders(FakeProvider("a")), SlowAdmission()) as host:
        await host.complete({"model": "m", "prompt": "hi"})
    request, (attempt,) = spans.request(), spans.attempts()
    assert request.attributes["ksi.wait_ms"] >= 40
    assert attempt.start_time - request.start_time >= 40_000_000


async def test_an_attempt_cut_short_by_a_cancel_joins_its_cancelled_request(otel_host: Any, spans: Spans) -> None:
    class CancellingQueue(DirectQueue):
        """Runs at once; ksi_cancel cancels the run and reports the cancelled result, as ksi-queue does."""

        def __init__(self) -> None:
            super().__init__()
            self.running: dict[str, tuple[asyncio.Task[Any], Ticket, Any]] = {}

        @hookimpl
        def ksi_enqueue(self, host: Any, request: Any) -> Ticket:
            ticket = Ticket(request.request_id)

            async def run() -> None:
                ticket.set_result(await host.execute(request))

            self.running[request.request_id] = (asyncio.ensure_future(run()), ticket, request)
            return ticket

        @hookimpl
        async def ksi_cancel(self, host: Any, request_id: str) -> bool:
            task, ticket, request = self.running.pop(request_id)
            task.cancel()
            result = CompletionResult.failed(request_id, Cancelled("cancelled while running"), model=request.model)
            ticket.set_result(await host.request_finished(request, result))
            return True

    async def hang(request: Any) -> ProviderResponse:
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    async with otel_host(CancellingQueue(), ScriptedProviders(FakeProvider("a", script=[hang]))) as host:
        ticket = await host.submit({"model": "m", "prompt": "hi", "request_id": "r-cancel"})
        await asyncio.sleep(0.06)  # the call is in flight (for at least 20 ms of the 60, however slow the start)
        assert await host.cancel("r-cancel")
        assert (await ticket.result()).status == "cancelled"
        for _ in range(50):  # the attempt cut short is reported in the background
            if spans.attempts():
                break
            await asyncio.sleep(0.01)
    request = spans.request()
    assert request.status.status_code == StatusCode.ERROR and request.attributes["error.type"] == "Cancelled"
    (attempt,) = spans.attempts()
    assert attempt.parent.span_id == request.context.span_id
    assert attempt.attributes["error.type"] == "Cancelled" and attempt.attributes["ksi.call.outcome"] == "unknown"
    assert attempt.end_time - attempt.start_time >= 20_000_000


async def test_disabled_in_config_it_writes_nothing(otel_host: Any, spans: Spans) -> None:
    async with otel_host(ScriptedProviders(FakeProvider("a")), otel={"enabled": False}) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
    assert spans.all() == []


async def test_a_request_the_sampler_leaves_out_builds_no_child_span(make_host: Any) -> None:
    from ksi_otel.plugin import Plugin
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class DropAll(Sampler):
        """Samples nothing; notes the name of every span the tracer was asked to start."""

        def __init__(self) -> None:
            self.asked: list[str] = []

        def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kw: Any) -> SamplingResult:
            self.asked.append(name)
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "DropAll"

    sampler = DropAll()
    provider = TracerProvider(sampler=sampler)
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a")), FailOver(),
                         Plugin(tracer_provider=provider), config={"otel": {}}) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
    assert sampler.asked == ["ksi.request m"]  # its attempt's span was not even started
    provider.shutdown()
