"""The whole chat surface through the openai plugin, against the local server over real HTTP:
every parameter sent as it is, tool calls and their round trip, JSON mode, usage details, refusals,
and streaming (pieces as they come, failover before the first, a cut, the consumer leaving)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai_helpers import EVERY_PARAMETER, WEATHER, FailOver, deployment, request, until

from ksi_host import ChatDelta, ProviderTimeout, ProviderUnavailable, hookimpl
from ksi_host.chat import PARAMETERS
from ksi_host.testing.faults import PROVIDER_FAULTS


class Recorder:
    """The upstream calls as ``ksi_record_usage`` gets them."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    @hookimpl
    def ksi_record_usage(self, call: Any) -> None:
        self.calls.append(call)


def test_the_sample_sets_every_chat_parameter() -> None:
    assert set(EVERY_PARAMETER) == set(PARAMETERS)


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_every_parameter_and_the_provider_options_arrive_as_sent(oa_host: Any, openai_server: Any,
                                                                       streamed: bool) -> None:
    options = {"top_k": 40, "repetition_penalty": 1.1, "metadata": {"run": "r1"}}
    req = {"model": "gpt-test", "prompt": "weather in Paris", **EVERY_PARAMETER, "provider_options": options}
    async with oa_host() as host:
        if streamed:
            stream = host.stream(req)
            [d async for d in stream]
            result = stream.result
        else:
            result = await host.complete(req)
    assert result is not None and result.ok, result
    body = openai_server.arrivals[0].body
    for name, value in {**EVERY_PARAMETER, **options}.items():
        assert body[name] == value, name
    assert body["model"] == "gpt-test" and body["messages"] == [{"role": "user", "content": "weather in Paris"}]
    assert set(body) == {"model", "messages", *EVERY_PARAMETER, *options} | ({"stream", "stream_options"} if streamed else set())
    if streamed:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_provider_options_may_not_set_what_the_plugin_sets(oa_host: Any, openai_server: Any) -> None:
    async with oa_host() as host:
        r = await host.complete({"model": "gpt-test", "prompt": "hi", "provider_options": {"stream": True}})
    assert r.error is not None and r.error["type"] == "BadRequest" and "provider_options.stream" in r.error["message"]
    assert openai_server.hits == 0


async def test_a_tool_call_round_trip(oa_host: Any, openai_server: Any) -> None:
    user = {"role": "user", "content": "weather in Paris"}
    async with oa_host() as host:
        first = await host.complete({"model": "gpt-test", "messages": [user], "tools": [WEATHER]})
        assert first.ok and first.finish_reason == "tool_calls" and first.text is None
        [call] = first.message["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": "weather in Paris"}
        tool = {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}
        second = await host.complete({"model": "gpt-test", "messages": [user, first.message, tool], "tools": [WEATHER]})
    assert second.ok and second.text == "the tool said: sunny, 21 C" and second.finish_reason == "stop"
    sent = openai_server.arrivals[1].body["messages"]
    assert sent == [user, {"role": "assistant", "content": None, "tool_calls": [call]}, tool]


async def test_json_mode(oa_host: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
    async with oa_host() as host:
        obj = await host.complete({"model": "gpt-test", "prompt": "Paris", "response_format": {"type": "json_object"}})
        typed = await host.complete({"model": "gpt-test", "prompt": "Paris", "response_format": {
            "type": "json_schema", "json_schema": {"name": "w", "schema": schema}}})
    assert json.loads(obj.text) == {"echo": "echo: Paris"}
    assert json.loads(typed.text) == {"city": "echo: Paris", "days": 1}


async def test_cached_and_reasoning_tokens_the_model_and_a_refusal(oa_host: Any, openai_server: Any) -> None:
    openai_server.cached_tokens, openai_server.reasoning_tokens = 3, 4
    recorder = Recorder()
    async with oa_host(recorder, deployments=[deployment(openai_server, upstream_model="served-name")]) as host:
        r = await host.complete({"model": "gpt-test", "prompt": "hi"})
        openai_server.script("refusal")
        refused = await host.complete({"model": "gpt-test", "prompt": "hi"})
    assert (r.usage.cached_tokens, r.usage.reasoning_tokens) == (3, 4) and r.model == "served-name"
    assert recorder.calls[0].usage == r.usage
    assert refused.ok and refused.message["refusal"] == "I can't help with that (test server)."


# -- streaming ------------------------------------------------------------------------------


async def test_pieces_arrive_before_the_upstream_finishes(oa_host: Any, openai_server: Any) -> None:
    openai_server.script("hold")  # the server holds its last chunk (the finish reason) until released
    async with oa_host() as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two three"})
        got: list[ChatDelta] = []
        async for delta in stream:
            if not got:
                assert openai_server.holding == 1  # the upstream has not finished: this piece came ahead of it
                openai_server.release()
            got.append(delta)
    assert [d.content for d in got if d.content] == ["echo: ", "one ", "two ", "three"]
    assert got[-2].finish_reason == "stop" and got[-1].usage is not None
    r = stream.result
    assert r is not None and r.ok and r.text == "echo: one two three" and r.attempts[0].ttft_ms is not None


async def test_failover_before_the_first_piece(oa_host: Any, openai_server: Any) -> None:
    deps = [deployment(openai_server, "first"), deployment(openai_server, "second")]
    openai_server.script("503")
    async with oa_host(FailOver(), deployments=deps) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "hi"})
        text = "".join([d.content or "" async for d in stream])
    assert text == "echo: hi" and stream.result is not None and stream.result.provider == "second"
    assert [(a.provider, a.error_type) for a in stream.result.attempts] == [("first", "ProviderUnavailable"), ("second", None)]


async def test_a_cut_stream_is_an_error_not_a_clean_end_and_is_not_retried(oa_host: Any, openai_server: Any) -> None:
    openai_server.cut_after = 3
    openai_server.script("cut")
    deps = [deployment(openai_server, "first"), deployment(openai_server, "second")]
    recorder = Recorder()
    async with oa_host(FailOver(), recorder, deployments=deps) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two three"})
        got = []
        with pytest.raises(ProviderUnavailable, match="first: connection failed"):
            async for delta in stream:
                got.append(delta.content)
    assert got == ["echo: ", "one "]  # the role chunk carries nothing
    assert stream.result is not None and stream.result.status == "error" and stream.result.text == "echo: one "
    assert openai_server.hits == 1 and [c.outcome for c in recorder.calls] == ["ProviderUnavailable"]


async def test_the_consumer_leaving_closes_the_connection(oa_host: Any, openai_server: Any) -> None:
    openai_server.script("hold")
    async with oa_host() as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two three"})
        async for _ in stream:
            break
        await until(lambda: openai_server.closed_early == 1)  # the server saw the client go, while it held
        assert openai_server.holding == 0
        assert (await host.complete({"model": "gpt-test", "prompt": "again"})).ok  # the pool still works


async def test_a_gap_longer_than_the_timeout_is_a_timeout(oa_host: Any, openai_server: Any) -> None:
    openai_server.script("hold")
    async with oa_host(deployments=[deployment(openai_server, timeout_s=0.3)]) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two"})
        with pytest.raises(ProviderTimeout, match="main: no answer within 0.3s"):
            [d async for d in stream]
        await until(lambda: openai_server.closed_early == 1)


async def test_usage_of_the_last_chunk_is_the_calls_usage(oa_host: Any, openai_server: Any) -> None:
    openai_server.cached_tokens = 2
    recorder = Recorder()
    async with oa_host(recorder, deployments=[deployment(openai_server, input_cost_per_mtok=1.0,
                                                         output_cost_per_mtok=2.0)]) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two"})
        [d async for d in stream]
    sent = openai_server.arrivals[0].usage
    [call] = recorder.calls
    assert call.outcome == "ok" and call.usage.prompt_tokens == sent["prompt_tokens"]
    assert (call.usage.completion_tokens, call.usage.cached_tokens) == (sent["completion_tokens"], 2)
    assert call.usage.cost_usd == pytest.approx((sent["prompt_tokens"] + 2 * sent["completion_tokens"]) / 1e6)
    assert stream.result is not None and stream.result.usage == call.usage


async def test_a_streamed_tool_call_is_put_together(oa_host: Any) -> None:
    async with oa_host() as host:
        stream = host.stream({"model": "gpt-test", "prompt": "weather in Paris", "tools": [WEATHER]})
        pieces = [d async for d in stream]
    assert sum(1 for d in pieces if d.tool_calls) > 2  # the name, then the arguments in pieces
    r = stream.result
    assert r is not None and r.finish_reason == "tool_calls"
    [call] = r.message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "weather in Paris"}


@pytest.mark.parametrize(("fault", "error", "status"), PROVIDER_FAULTS)
async def test_each_fault_maps_the_same_when_streamed(make_provider: Any, openai_server: Any, api_key: str,
                                                      fault: str, error: type, status: int | None) -> None:
    p = make_provider()
    openai_server.script(fault)
    with pytest.raises(error) as info:
        [d async for d in p.stream(request(), timeout_s=5)]
    assert type(info.value) is error and info.value.provider == "main" and info.value.status_code == status
    assert openai_server.hits == 1
    assert [d async for d in p.stream(request(), timeout_s=5)][-1].usage is not None  # the pool still works


async def test_an_endpoint_that_ignores_stream_answers_as_one_piece(make_provider: Any, api_key: str) -> None:
    # an endpoint that does not stream: the test server, its body's "stream" taken out behind the provider's back
    p = make_provider()
    original = p.body
    p.body = lambda r, stream=False: {k: v for k, v in original(r, stream=stream).items()  # type: ignore[method-assign]
                                      if k not in ("stream", "stream_options")}
    pieces = [d async for d in p.stream(request(), timeout_s=5)]
    assert len(pieces) == 1 and pieces[0].content == "echo: hello there" and pieces[0].finish_reason == "stop"
    assert pieces[0].usage is not None
