"""The chat surface through the litellm plugin, against the local server over real HTTP (real litellm):
the provider conformance suite (:mod:`ksi_host.testing.conformance`: every parameter sent as it is, tool
calls and their round trip, JSON mode, usage details, refusals, streaming, each fault mapped), then what
is litellm's own: ``provider_options`` kept from litellm's arguments, a parameter litellm says a
provider cannot take refused, and the offline mock deployment answering tool calls, whole and streamed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from ksi_provider_litellm.plugin import Plugin
from provider_helpers import WEATHER, deployment

from ksi_host.testing import DirectQueue
from ksi_host.testing.conformance import DeploymentSpec, ProviderConformance


class TestLitellmConformance(ProviderConformance):
    EXACT_STATUS = False  # litellm reports a malformed answer as its own HTTP 500

    def plugin(self) -> Plugin:
        return Plugin()

    def config(self, deployments: Sequence[DeploymentSpec]) -> dict[str, Any]:
        return {"litellm": {"deployments": [
            {"name": d.name, "model": d.model, "litellm_model": f"openai/{d.upstream_model or d.model}",
             "api_base": d.api_base, "api_key_env": d.api_key_env, "timeout_s": d.timeout_s} for d in deployments]}}


async def test_provider_options_cannot_reach_litellms_own_arguments(lit_host: Any, openai_server: Any) -> None:
    # (that provider_options may not set model, messages, stream, stream_options: the conformance suite)
    async with lit_host() as host:
        r = await host.complete({"model": "gpt-test", "prompt": "hi", "provider_options": {"api_base": "http://elsewhere"}})
    assert r.ok and openai_server.arrivals[0].body["api_base"] == "http://elsewhere"  # a body key, not the endpoint
    assert openai_server.hits == 1


async def test_a_parameter_a_provider_cannot_take_is_refused_before_anything_is_sent(make_host: Any, openai_server: Any,
                                                                                     api_key: str) -> None:
    d = deployment(openai_server, "claude", model="claude-test", upstream="anthropic/claude-3-5-sonnet-20240620")
    async with make_host(Plugin(), DirectQueue(), config={"litellm": {"deployments": [d]}}) as host:
        r = await host.complete({"model": "claude-test", "prompt": "hi", "logit_bias": {"50256": -100}})
    assert r.error is not None and r.error["type"] == "BadRequest", r.error
    assert "logit_bias" in r.error["message"] and "claude: " in r.error["message"] and "nothing was sent" in r.error["message"]
    assert openai_server.hits == 0


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
