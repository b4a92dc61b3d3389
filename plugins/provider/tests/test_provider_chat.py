"""The whole chat surface through the litellm plugin, against the local server over real HTTP (real
litellm): every parameter sent as it is, tool calls and their round trip, JSON mode, usage details,
refusals, streaming; and the offline mock deployment answering tool calls, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ksi_provider_litellm.config import LitellmConfig, LitellmDeployment
from ksi_provider_litellm.plugin import Plugin, build_pool
from ksi_provider_litellm.provider import LitellmProvider
from provider_helpers import EVERY_PARAMETER, WEATHER, FailOver, FakeClock, deployment, request, until

from ksi_host import ChatDelta, ProviderTimeout, ProviderUnavailable, hookimpl
from ksi_host.chat import PARAMETERS
from ksi_host.testing import DirectQueue
from ksi_host.testing.faults import PROVIDER_FAULTS


class Recorder:
    """The upstream calls as ``ksi_record_usage`` gets them."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    @hookimpl
    def ksi_record_usage(self, call: Any) -> None:
        self.calls.append(call)


def provider(server: Any, **kw: Any) -> LitellmProvider:
    d = LitellmDeployment(**deployment(server, **kw))
    p = build_pool(LitellmConfig(deployments=[d]), clock=FakeClock()).get(d.name)
    assert p is not None
    return p


def test_the_sample_sets_every_chat_parameter() -> None:
    assert set(EVERY_PARAMETER) == set(PARAMETERS)


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_every_parameter_and_the_provider_options_arrive_as_sent(lit_host: Any, openai_server: Any,
                                                                       streamed: bool) -> None:
    options = {"top_k": 40, "repetition_penalty": 1.1, "guided": {"choice": ["a", "b"]}}
    req = {"model": "gpt-test", "prompt": "weather in Paris", **EVERY_PARAMETER, "provider_options": options}
    async with lit_host() as host:
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


async def test_provider_options_cannot_reach_litellms_own_arguments(lit_host: Any, openai_server: Any) -> None:
    async with lit_host() as host:
        r = await host.complete({"model": "gpt-test", "prompt": "hi", "provider_options": {"api_base": "http://elsewhere"}})
        refused = await host.complete({"model": "gpt-test", "prompt": "hi", "provider_options": {"messages": []}})
    assert r.ok and openai_server.arrivals[0].body["api_base"] == "http://elsewhere"  # a body key, not the endpoint
    assert refused.error is not None and refused.error["type"] == "BadRequest"
    assert "provider_options.messages" in refused.error["message"] and openai_server.hits == 1


async def test_a_parameter_a_provider_cannot_take_is_refused_before_anything_is_sent(make_host: Any, openai_server: Any,
                                                                                     api_key: str) -> None:
    d = deployment(openai_server, "claude", model="claude-test", upstream="anthropic/claude-3-5-sonnet-20240620")
    async with make_host(Plugin(), DirectQueue(), config={"litellm": {"deployments": [d]}}) as host:
        r = await host.complete({"model": "claude-test", "prompt": "hi", "logit_bias": {"50256": -100}})
    assert r.error is not None and r.error["type"] == "BadRequest", r.error
    assert "logit_bias" in r.error["message"] and "claude: " in r.error["message"] and "nothing was sent" in r.error["message"]
    assert openai_server.hits == 0


async def test_a_tool_call_round_trip(lit_host: Any, openai_server: Any) -> None:
    user = {"role": "user", "content": "weather in Paris"}
    async with lit_host() as host:
        first = await host.complete({"model": "gpt-test", "messages": [user], "tools": [WEATHER]})
        assert first.ok and first.finish_reason == "tool_calls" and first.text is None
        [call] = first.message["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": "weather in Paris"}
        tool = {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}
        second = await host.complete({"model": "gpt-test", "messages": [user, first.message, tool], "tools": [WEATHER]})
    assert second.ok and second.text == "the tool said: sunny, 21 C" and second.finish_reason == "stop"
    sent = openai_server.arrivals[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"] == [call] and sent[2] == tool


async def test_json_mode(lit_host: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
    async with lit_host() as host:
        obj = await host.complete({"model": "gpt-test", "prompt": "Paris", "response_format": {"type": "json_object"}})
        typed = await host.complete({"model": "gpt-test", "prompt": "Paris", "response_format": {
            "type": "json_schema", "json_schema": {"name": "w", "schema": schema}}})
    assert json.loads(obj.text) == {"echo": "echo: Paris"}
    assert json.loads(typed.text) == {"city": "echo: Paris", "days": 1}


async def test_cached_and_reasoning_tokens_the_model_and_a_refusal(lit_host: Any, openai_server: Any) -> None:
    openai_server.cached_tokens, openai_server.reasoning_tokens = 3, 4
    async with lit_host(deployments=[deployment(openai_server, upstream="openai/served-name")]) as host:
        r = await host.complete({"model": "gpt-test", "prompt": "hi"})
        openai_server.script("refusal")
        refused = await host.complete({"model": "gpt-test", "prompt": "hi"})
    assert (r.usage.cached_tokens, r.usage.reasoning_tokens) == (3, 4) and r.model == "served-name"
    assert refused.ok and refused.message["refusal"] == "I can't help with that (test server)."


# -- streaming ------------------------------------------------------------------------------


async def test_pieces_arrive_before_the_upstream_finishes(lit_host: Any, openai_server: Any) -> None:
    openai_server.script("hold")
    async with lit_host() as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two three"})
        got: list[ChatDelta] = []
        async for delta in stream:
            if not got:
                assert openai_server.holding == 1  # this piece came before the upstream finished
                openai_server.release()
            got.append(delta)
    assert "".join(d.content or "" for d in got) == "echo: one two three"
    r = stream.result
    assert r is not None and r.ok and r.finish_reason == "stop" and r.usage.total_tokens == 10


async def test_failover_before_the_first_piece(lit_host: Any, openai_server: Any) -> None:
    deps = [deployment(openai_server, "first"), deployment(openai_server, "second")]
    openai_server.script("503")
    async with lit_host(FailOver(), deployments=deps) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "hi"})
        text = "".join([d.content or "" async for d in stream])
    assert text == "echo: hi" and stream.result is not None
    assert [(a.provider, a.error_type) for a in stream.result.attempts] == [("first", "ProviderUnavailable"), ("second", None)]
    assert openai_server.hits == 2  # one upstream call per attempt: no retry inside litellm


async def test_a_cut_stream_is_an_error_not_a_clean_end(lit_host: Any, openai_server: Any) -> None:
    openai_server.cut_after = 3
    openai_server.script("cut")
    recorder = Recorder()
    async with lit_host(FailOver(), recorder, deployments=[deployment(openai_server, "first"),
                                                           deployment(openai_server, "second")]) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two three"})
        got = []
        with pytest.raises(ProviderUnavailable, match="first"):
            async for delta in stream:
                got.append(delta.content)
    assert "".join(c or "" for c in got) == "echo: one "
    assert stream.result is not None and stream.result.status == "error" and openai_server.hits == 1
    assert [c.outcome for c in recorder.calls] == ["ProviderUnavailable"]


async def test_the_consumer_leaving_closes_the_connection(lit_host: Any, openai_server: Any) -> None:
    openai_server.script("hold")
    async with lit_host() as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two three"})
        async for _ in stream:
            break
        await until(lambda: openai_server.closed_early == 1)
        assert (await host.complete({"model": "gpt-test", "prompt": "again"})).ok


async def test_a_gap_longer_than_the_timeout_is_a_timeout(lit_host: Any, openai_server: Any) -> None:
    openai_server.script("hold")
    async with lit_host(deployments=[deployment(openai_server, timeout_s=0.5)]) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two"})
        with pytest.raises(ProviderTimeout, match="main"):
            [d async for d in stream]
        await until(lambda: openai_server.closed_early == 1)


async def test_usage_of_the_last_chunk_is_the_calls_usage(lit_host: Any, openai_server: Any) -> None:
    openai_server.cached_tokens = 2
    recorder = Recorder()
    async with lit_host(recorder) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two"})
        [d async for d in stream]
    sent = openai_server.arrivals[0].usage
    [call] = recorder.calls
    assert call.outcome == "ok" and call.usage.cached_tokens == 2
    assert (call.usage.prompt_tokens, call.usage.completion_tokens) == (sent["prompt_tokens"], sent["completion_tokens"])


async def test_a_streamed_tool_call_is_put_together(lit_host: Any) -> None:
    async with lit_host() as host:
        stream = host.stream({"model": "gpt-test", "prompt": "weather in Paris", "tools": [WEATHER]})
        [d async for d in stream]
    r = stream.result
    assert r is not None and r.finish_reason == "tool_calls"
    [call] = r.message["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "weather in Paris"}


@pytest.mark.parametrize(("fault", "error", "status"), PROVIDER_FAULTS)
async def test_each_fault_maps_the_same_when_streamed(openai_server: Any, api_key: str, fault: str, error: type,
                                                      status: int | None) -> None:
    p = provider(openai_server)
    openai_server.script(fault)
    with pytest.raises(error) as info:
        [d async for d in p.stream(request(), timeout_s=5)]
    assert type(info.value) is error and info.value.provider == "main"
    if status is not None:
        assert info.value.status_code == status
    assert openai_server.hits == 1


# -- the mock deployment ----------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_the_mock_answers_tool_calls_then_the_tool_result_offline(make_host: Any, streamed: bool) -> None:
    user = {"role": "user", "content": "weather in Paris"}

    async def ask(host: Any, req: dict[str, Any]) -> Any:
        if not streamed:
            return await host.complete(req)
        stream = host.stream(req)
        [d async for d in stream]
        return stream.result

    async with make_host(Plugin(), DirectQueue()) as host:
        first = await ask(host, {"model": "mock/gpt", "messages": [user], "tools": [WEATHER]})
        again = await ask(host, {"model": "mock/gpt", "messages": [user], "tools": [WEATHER]})
        [call] = first.message["tool_calls"]
        tool = {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
        second = await ask(host, {"model": "mock/gpt", "messages": [user, first.message, tool], "tools": [WEATHER]})
        typed = await ask(host, {"model": "mock/gpt", "prompt": "Paris", "response_format": {
            "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER["function"]["parameters"]}}})
    assert first.ok and first.provider == "mock" and first.finish_reason == "tool_calls"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "weather in Paris"}'}
    assert again.message == first.message  # deterministic, the call id too
    assert second.ok and second.text == "mock response to the tool result: sunny" and second.finish_reason == "stop"
    assert json.loads(typed.text) == {"city": "mock response to: Paris"}
    assert first.usage.total_tokens > 0 and second.usage.total_tokens > 0


async def test_the_mock_streams(make_host: Any) -> None:
    async with make_host(Plugin(), DirectQueue()) as host:
        stream = host.stream({"model": "mock/gpt", "prompt": "Summarise the plan"})
        pieces = [d async for d in stream]
    assert len([d for d in pieces if d.content]) > 1  # in pieces, as litellm's mock streams them
    assert stream.result is not None and stream.result.text == "mock response to: Summarise the plan"
    assert stream.result.usage.total_tokens > 0 and stream.result.finish_reason == "stop"
