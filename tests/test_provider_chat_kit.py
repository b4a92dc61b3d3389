"""The provider kit's chat surface: DeploymentProvider.stream (the key, the timeouts, the circuit
around a plugin's attempt_stream), the OpenAI wire format (body, answer, chunks, server-sent
events) and what a deployment supports."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ksi_host.errors import AuthFailed, BadRequest, ProviderTimeout, ProviderUnavailable, RateLimited
from ksi_host.models import ChatDelta, CompletionRequest, ProviderResponse, Usage
from ksi_host.providers import (
    CircuitBreaker,
    Deployment,
    DeploymentPool,
    DeploymentProvider,
    delta_of,
    request_body,
    response_of,
    sse_data,
    usage_of,
)

REQUEST = CompletionRequest.from_dict({"model": "m", "prompt": "hi"})
END = object()  # a script item: the stream ends (without a finish_reason unless one came)


class Streaming(DeploymentProvider):
    """attempt_stream plays a script: strings (content), ChatDelta, exceptions, floats (a pause in seconds)."""

    log = logging.getLogger("test.provider_chat_kit")

    def __init__(self, script: list[Any], **deployment: Any) -> None:
        super().__init__(Deployment(name="d1", model="m", **deployment), CircuitBreaker(2, 30.0))
        self.script = script
        self.seen: list[tuple[float | None, str | None]] = []
        self.closed = 0
        self.finished = 0

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        raise AssertionError("a streaming provider streams")

    async def attempt_stream(self, request: CompletionRequest, timeout_s: float | None,
                             key: str | None) -> AsyncIterator[ChatDelta]:
        self.seen.append((timeout_s, key))
        try:
            for item in self.script:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, float):
                    await asyncio.sleep(item)
                elif isinstance(item, ChatDelta):
                    yield item
                else:
                    yield ChatDelta(content=item)
            self.finished += 1
        finally:
            if not self.finished:
                self.closed += 1  # (the upstream call closed before its end)


async def collect(p: DeploymentProvider, timeout_s: float | None = None) -> list[ChatDelta]:
    return [d async for d in p.stream(REQUEST, timeout_s=timeout_s)]


async def test_a_stream_that_ends_with_a_finish_reason_is_a_success_and_gets_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KIT_KEY", "sk-kit")
    p = Streaming(["Hel", "lo", ChatDelta(finish_reason="stop"), ChatDelta(usage=Usage(1, 2, 3))],
                  api_key_env="TEST_KIT_KEY", timeout_s=9.0)
    p.breaker.record_failure()
    pieces = await collect(p)
    assert [d.content for d in pieces] == ["Hel", "lo", None, None] and pieces[-1].usage == Usage(1, 2, 3)
    assert p.seen == [(9.0, "sk-kit")] and p.breaker.failures == 0  # a success resets the count


async def test_a_stream_that_ends_without_a_finish_reason_is_a_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Streaming(["half an"])
    with pytest.raises(ProviderUnavailable, match="d1: the stream ended before the upstream said it finished") as e:
        await collect(p)
    assert e.value.provider == "d1" and p.breaker.failures == 1


async def test_an_error_mid_stream_counts_and_is_raised() -> None:
    p = Streaming(["partial", RateLimited("slow down", retry_after=3.0)])
    got: list[ChatDelta] = []
    with pytest.raises(RateLimited) as e:
        async for d in p.stream(REQUEST, timeout_s=None):
            got.append(d)
    assert [d.content for d in got] == ["partial"] and e.value.provider == "d1" and p.breaker.failures == 1


async def test_the_timeout_bounds_the_first_piece_and_each_gap_not_the_whole_stream() -> None:
    slow = Streaming(["a", 0.05, "b", 0.05, "c", 0.05, ChatDelta(finish_reason="stop")])
    assert len(await collect(slow, timeout_s=0.2)) == 4  # 0.15 s in all, no gap over 0.2 s
    first = Streaming([0.5, "late", ChatDelta(finish_reason="stop")])
    with pytest.raises(ProviderTimeout, match="d1: no answer within 0.1s"):
        await collect(first, timeout_s=0.1)
    gap = Streaming(["early", 0.5, ChatDelta(finish_reason="stop")])
    with pytest.raises(ProviderTimeout):
        await collect(gap, timeout_s=0.1)
    assert first.closed == gap.closed == 1  # the upstream call was closed
    assert first.breaker.failures == gap.breaker.failures == 1


async def test_prepare_runs_before_the_wait_for_the_first_piece_starts() -> None:
    class SlowToPrepare(Streaming):
        async def prepare(self) -> None:
            await asyncio.sleep(0.3)  # a lazy import, say: not the upstream's time

    p = SlowToPrepare(["fast", ChatDelta(finish_reason="stop")])
    assert [d.content for d in await collect(p, timeout_s=0.1)] == ["fast", None]


async def test_closing_the_stream_early_closes_the_upstream_call_and_leaves_the_circuit_alone() -> None:
    p = Streaming(["one", "two", 0.5, ChatDelta(finish_reason="stop")])
    p.breaker.record_failure()
    pieces = p.stream(REQUEST, timeout_s=None)
    assert (await anext(pieces)).content == "one"
    await pieces.aclose()  # type: ignore[attr-defined]
    assert p.closed == 1 and p.breaker.failures == 1  # neither a success nor a failure


async def test_a_half_open_trial_is_freed_when_the_consumer_leaves() -> None:
    clock = [0.0]
    p = Streaming(["one", ChatDelta(finish_reason="stop")])
    p.breaker = CircuitBreaker(1, 10.0, clock=lambda: clock[0])
    p.breaker.record_failure()
    clock[0] = 11.0
    assert p.breaker.try_acquire(60.0) and not p.breaker.try_acquire(60.0)  # the trial is out
    pieces = p.stream(REQUEST, timeout_s=None)
    await anext(pieces)
    await pieces.aclose()  # type: ignore[attr-defined]
    assert p.breaker.state == "half_open" and p.breaker.try_acquire(60.0)  # another trial may go


async def test_an_unset_key_fails_before_the_stream_and_a_programming_error_passes_through(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_KIT_UNSET", raising=False)
    p = Streaming(["never"], api_key_env="TEST_KIT_UNSET")
    with pytest.raises(AuthFailed, match="TEST_KIT_UNSET"):
        await collect(p)
    assert p.seen == [] and p.breaker.failures == 1
    bug = Streaming(["x", ZeroDivisionError("a bug")])
    with pytest.raises(ZeroDivisionError):
        await collect(bug)
    assert bug.breaker.failures == 0


async def test_a_provider_without_attempt_stream_streams_its_answer_as_one_piece() -> None:
    class Whole(DeploymentProvider):
        async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
            return ProviderResponse("all at once", usage=Usage(1, 3, 4), model="up",
                                    tool_calls=({"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},),
                                    finish_reason="tool_calls")

    p = Whole(Deployment(name="w", model="m"), CircuitBreaker())
    assert not p.can_stream and Streaming([]).can_stream
    [piece] = await collect(p)
    assert piece == ChatDelta("all at once", ({"index": 0, "id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}},), "tool_calls",
                              Usage(1, 3, 4), "up")


def test_what_a_deployment_supports_goes_into_its_provider_info() -> None:
    class Narrow(Streaming):
        supports = frozenset({"temperature"})

    pool = DeploymentPool([Narrow([])])
    assert pool.infos("m", "test")[0].supports == frozenset({"temperature"})
    assert DeploymentPool([Streaming([])]).infos("m", "test")[0].supports is None


# -- the OpenAI wire format ------------------------------------------------------------------


def test_the_body_holds_every_parameter_set_and_the_provider_options_as_they_are() -> None:
    r = CompletionRequest.from_dict({
        "model": "m", "prompt": "hi", "temperature": 0.2, "stop": ["x"], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "logit_bias": {"50256": -100}, "provider_options": {"top_k": 5, "temperature": 0.9, "extra": {"a": [1]}}})
    body = request_body(r, "upstream-m")
    assert body == {"model": "upstream-m", "messages": r.messages, "temperature": 0.9, "stop": ["x"],
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                    "logit_bias": {"50256": -100}, "top_k": 5, "extra": {"a": [1]}}  # provider_options win
    streamed = request_body(CompletionRequest.from_dict({"model": "m", "prompt": "hi"}), "m", stream=True)
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    for key in ("model", "messages", "stream", "stream_options"):
        bad = CompletionRequest.from_dict({"model": "m", "prompt": "hi", "provider_options": {key: 1}})
        with pytest.raises(BadRequest, match=f"d1: provider_options.{key} is set by the provider itself"):
            request_body(bad, "m", provider="d1")


def test_an_answer_with_tool_calls_refusal_finish_reason_model_and_usage_details() -> None:
    payload = {"model": "gpt-up", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {"b": 2}}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 3}}}
    r = response_of(payload, provider="d1", cost=lambda p, c: (p + c) / 1000, session_id="s")
    assert r.text == "" and r.model == "gpt-up" and r.finish_reason == "tool_calls" and r.session_id == "s"
    assert r.tool_calls == ({"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"b": 2}'}})
    assert r.usage == Usage(10, 7, 17, 0.017, 4, 3)
    refused = response_of({"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]},
                          provider="d1")
    assert (refused.text, refused.refusal, refused.usage, refused.model) == ("", "no", None, None)
    legacy = response_of({"choices": [{"message": {"content": "x"}, "finish_reason": "function_call"}]}, provider="d1")
    assert legacy.finish_reason == "tool_calls"


@pytest.mark.parametrize(("payload", "why"), [
    ([], "a JSON list, not an object"),
    ({"choices": []}, "no choices"),
    ({"choices": [{"message": "text"}]}, "no message"),
    ({"choices": [{"message": {"content": 5}}]}, "content is int"),
    ({"choices": [{"message": {"content": "", "tool_calls": [{"function": {"name": "f"}}]}}]}, "an id and a name"),
    ({"choices": [{"message": {"content": "", "tool_calls": {"id": "x"}}}]}, "not a list"),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": 3}]}, "finish_reason is int"),
    ({"choices": [{"message": {"content": "x"}, "logprobs": [-0.5]}]}, "logprobs is list, not an object"),
    ({"choices": [{"message": {"content": "x"}, "logprobs": {"content": "x"}}]}, "logprobs.content is str, not a list"),
])
def test_what_is_not_an_answer_is_a_malformed_response(payload: Any, why: str) -> None:
    with pytest.raises(ProviderUnavailable, match=f"d1: malformed response: .*{why}"):
        response_of(payload, provider="d1")


def test_an_error_object_at_a_success_status_is_that_error() -> None:
    with pytest.raises(RateLimited):
        response_of({"error": {"message": "slow"}}, provider="d1", status=429)


def test_chunks_become_deltas() -> None:
    assert delta_of({"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
                    provider="d1") is None  # nothing in it
    assert delta_of({"model": "up", "choices": [{"delta": {"content": "Hi"}}]}, provider="d1") == ChatDelta("Hi", model="up")
    calls = delta_of({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"a"'}}]}}]}, provider="d1")
    assert calls is not None and calls.tool_calls == (
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}},
        {"index": 1, "function": {"arguments": '{"a"'}})
    end = delta_of({"choices": [{"delta": {}, "finish_reason": "length"}], "usage": None}, provider="d1")
    assert end == ChatDelta(finish_reason="length")
    usage = delta_of({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                               "prompt_tokens_details": {"cached_tokens": 1}}}, provider="d1")
    assert usage is not None and usage.usage == Usage(2, 3, 5, None, 1, None)
    assert delta_of({"choices": [{"delta": {"refusal": "no"}}]}, provider="d1") == ChatDelta(refusal="no")
    with pytest.raises(RateLimited, match="d1"):
        delta_of({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}, provider="d1")
    with pytest.raises(ProviderUnavailable, match="d1: .*overloaded"):
        delta_of({"error": {"message": "overloaded"}}, provider="d1")
    with pytest.raises(ProviderUnavailable, match="malformed"):
        delta_of({"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}, provider="d1")
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
    probs = delta_of({"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [entry], "refusal": None}}]},
                     provider="d1")
    assert probs == ChatDelta("Hi", logprobs={"content": [entry], "refusal": None})
    with pytest.raises(ProviderUnavailable, match="d1: malformed response: .*logprobs is str"):
        delta_of({"choices": [{"delta": {"content": "Hi"}, "logprobs": "-0.5"}]}, provider="d1")



def test_the_system_fingerprint_of_an_answer_and_of_a_chunk_is_read() -> None:
    answer = {"choices": [{"message": {"content": "x"}}]}
    assert response_of({**answer, "system_fingerprint": "fp_44709d6fcb"}, provider="d1").system_fingerprint == "fp_44709d6fcb"
    for none in ({}, {"system_fingerprint": None}, {"system_fingerprint": 3}):  # absent, null, or not a string: none
        assert response_of({**answer, **none}, provider="d1").system_fingerprint is None
    chunk = {"system_fingerprint": "fp_1", "choices": [{"delta": {"content": "Hi"}}]}
    assert delta_of(chunk, provider="d1") == ChatDelta("Hi", system_fingerprint="fp_1")
    assert delta_of({**chunk, "system_fingerprint": None}, provider="d1") == ChatDelta("Hi")
    assert delta_of({"system_fingerprint": "fp_1", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
                    provider="d1") is None  # a fingerprint alone is no piece: every other chunk says it too

def test_usage_of_leaves_unreported_details_unknown() -> None:
    assert usage_of({"prompt_tokens": 4, "completion_tokens": 1}) == Usage(4, 1, 5)
    assert usage_of({"prompt_tokens": 4, "completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": 0}},
                    cost=lambda p, c: None) == Usage(4, 1, 5, None, None, 0)
    assert usage_of(None) is None and usage_of("x") is None


async def test_server_sent_events_split_anywhere_are_put_together() -> None:
    raw = (b": a comment\n\ndata: {\"a\": 1}\n\ndata: line one\r\ndata: line two\r\n\r\n"
           b"event: ping\ndata:nospace\n\ndata: [DONE]\n\ndata: cut without its blank line\n")

    async def pieces(size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(raw), size):
            yield raw[i:i + size]

    for size in (1, 3, 7, len(raw)):
        assert [e async for e in sse_data(pieces(size))] == ['{"a": 1}', "line one\nline two", "nospace", "[DONE]"]
