"""The chat-completions surface at the edge: messages, tools, parameters, what a request needs,
and what the host does with what a deployment supports."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ksi_host import CompletionRequest, ProviderInfo, ProviderResponse, Usage, ValidationError, hookimpl
from ksi_host.chat import MAX_DEPTH, PARAMETERS
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def req(**kw: Any) -> CompletionRequest:
    return CompletionRequest.from_dict({"model": "m", **kw})


def refused(field: str, reason: str, **kw: Any) -> None:
    with pytest.raises(ValidationError) as e:
        req(**kw)
    assert e.value.field == field, e.value.message
    assert reason in e.value.reason, e.value.message


def test_a_tool_conversation_in_the_openai_shape_is_accepted() -> None:
    r = req(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ], tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False)
    assert r.tools == (WEATHER,) and r.parameters()["tools"] == [WEATHER]
    assert r.needs() == frozenset({"tools", "tool_choice", "parallel_tool_calls", "image_url"})


@pytest.mark.parametrize(("messages", "field", "reason"), [
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "required for role tool"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "messages[1].content",
     "required for an assistant message without tool_calls"),
    ([{"role": "user", "content": None}], "messages[0].content", "required for role user"),
    ([{"role": "function", "content": "x"}], "messages[0].role", "deprecated"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "must be one of"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id", "unknown key"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "messages[0].content[0].type",
     "not allowed here"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url.url",
     "non-empty string"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages[0].tool_calls[0].id", "non-empty string"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}],
     "messages[0].tool_calls[0].function.arguments", "string"),
    ([{"role": "user", "content": 5}], "messages[0].content", "string or a list of content parts"),
    ([], "messages", "non-empty list"),
])
def test_bad_messages_are_refused_naming_the_index_and_field(messages: Any, field: str, reason: str) -> None:
    refused(field, reason, messages=messages)


def test_cache_control_is_accepted_on_messages_and_parts() -> None:
    r = req(messages=[{"role": "system", "content": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}]},
                      {"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}])
    assert r.messages[1]["cache_control"] == {"type": "ephemeral"}


@pytest.mark.parametrize(("params", "field", "reason"), [
    ({"n": 2}, "n", "only 1 is supported"),
    ({"top_p": 1.5}, "top_p", "from 0 to 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "1 to 4 strings"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"presence_penalty": -3}, "presence_penalty", "from -2 to 2"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"50256": 101}}, "logit_bias.50256", "from -100 to 100"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters, digits"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "names two tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "must be 'function'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "one of none, auto, required"),
    ({"tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", "non-empty string"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     "non-empty string"),
    ({"reasoning_effort": "maximum"}, "reasoning_effort", "one of none, minimal, low, medium, high, xhigh, max"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "integer from 1"),
    ({"provider_options": [1]}, "provider_options", "must be an object"),
    ({"temperature": float("nan")}, "temperature", "from 0 to 2"),
    ({"bogus_param": 1}, "bogus_param", "unknown field"),
    ({"continue_session": True}, "continue_session", "needs a session_id"),
])
def test_bad_parameters_are_refused_naming_them(params: dict[str, Any], field: str, reason: str) -> None:
    refused(field, reason, prompt="hi", **params)


def test_every_parameter_of_the_schema_is_kept_as_given() -> None:
    given = {"max_tokens": 5, "max_completion_tokens": 6, "temperature": 0.2, "top_p": 0.9, "stop": ["END"],
             "seed": 7, "presence_penalty": 0.1, "frequency_penalty": -0.1, "logit_bias": {"50256": -100},
             "logprobs": True, "top_logprobs": 2, "n": 1, "user": "u-1", "tools": [WEATHER],
             "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": True,
             "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                         "strict": True}},
             "reasoning_effort": "low", "verbosity": "low", "service_tier": "auto", "store": False,
             "modalities": ["text"], "audio": {"voice": "alloy", "format": "wav"},
             "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
             "prompt_cache_key": "k", "safety_identifier": "s"}
    assert set(given) == set(PARAMETERS)  # the test covers every parameter there is
    r = req(prompt="hi", **given)
    assert r.parameters() == given
    assert json.loads(json.dumps(r.to_dict()))["tools"] == [WEATHER]
    assert CompletionRequest.from_dict(r.to_dict()) == r


def test_documents_nested_past_the_limit_are_refused_without_recursion() -> None:
    deep: Any = "leaf"
    for _ in range(5000):  # far past Python's recursion limit
        deep = [deep]
    refused("provider_options.x" + "[0]" * (MAX_DEPTH - 1), f"deeper than {MAX_DEPTH}", prompt="hi", provider_options={"x": deep})
    schema: Any = {"type": "string"}
    for _ in range(2000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ValidationError, match="nests deeper than"):
        req(prompt="hi", tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])


def test_a_lone_surrogate_anywhere_is_refused_naming_where() -> None:
    refused("tools[0].function.description", "lone surrogate", prompt="hi",
            tools=[{"type": "function", "function": {"name": "f", "description": "bad \ud800"}}])
    refused("messages[0].content[0].text", "lone surrogate", messages=[{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}])


def test_the_answer_message_and_usage_sums() -> None:
    answer = ProviderResponse("", tool_calls=[CALL], finish_reason="tool_calls")
    assert answer.message() == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert ProviderResponse("hi").message() == {"role": "assistant", "content": "hi"}
    total = Usage(10, 5, 15, None, cached_tokens=4) + Usage(1, 2, 3, 0.5, reasoning_tokens=2)
    assert total == Usage(11, 7, 18, 0.5, cached_tokens=4, reasoning_tokens=2)
    assert (Usage() + Usage()).cached_tokens is None  # unknown stays unknown


async def test_a_tool_call_answer_becomes_the_results_message(make_host: Any) -> None:
    p = FakeProvider("p", script=[ProviderResponse("", usage=Usage(5, 3, 8), tool_calls=[CALL], finish_reason="tool_calls",
                                                   model="m-2024")])
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        r = await host.complete({"model": "m", "prompt": "Weather in Oslo?", "tools": [WEATHER]})
    assert r.ok and r.finish_reason == "tool_calls" and r.text is None and r.model == "m-2024"
    assert r.message == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert r.to_dict()["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


class Limited(ScriptedProviders):
    """Two deployments of m: `plain` supports only max_tokens and temperature, `full` everything."""

    @hookimpl
    def ksi_list_providers(self, model: str | None) -> list[ProviderInfo]:
        return [ProviderInfo("plain", "m", "limited", supports=frozenset({"max_tokens", "temperature"})),
                ProviderInfo("full", "m", "limited")][: 1 if self.only_plain else 2]

    def __init__(self, *providers: FakeProvider, only_plain: bool = False) -> None:
        super().__init__(*providers)
        self.only_plain = only_plain


async def test_a_request_goes_only_where_its_parameters_can_be_sent(make_host: Any) -> None:
    plain, full = FakeProvider("plain", "m"), FakeProvider("full", "m")
    async with make_host(DirectQueue(), Limited(plain, full)) as host:
        assert (await host.complete({"model": "m", "prompt": "hi", "max_tokens": 5})).provider == "plain"
        r = await host.complete({"model": "m", "prompt": "hi", "tools": [WEATHER]})
        assert r.provider == "full" and len(plain.calls) == 1


async def test_a_request_nobody_can_send_ends_with_a_bad_request_and_nothing_is_sent(make_host: Any) -> None:
    plain = FakeProvider("plain", "m")
    async with make_host(DirectQueue(), Limited(plain, only_plain=True)) as host:
        r = await host.complete({"model": "m", "prompt": "hi", "tools": [WEATHER], "top_p": 0.5})
    assert r.error["type"] == "BadRequest" and not plain.calls
    assert r.error["message"] == "tools, top_p not supported by plain (nothing was sent)"


def test_the_testing_kits_every_parameter_names_every_chat_parameter():
    from ksi_host.testing.chat import EVERY_PARAMETER

    assert set(EVERY_PARAMETER) == set(PARAMETERS)
