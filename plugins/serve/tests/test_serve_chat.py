"""POST /v1/chat/completions through the stock openai client: answers, headers, ids, tools, errors."""

from __future__ import annotations

import asyncio
import json
import typing

import aiohttp
import openai
import pydantic
import pytest
from conftest import until

from ksi_host import (
    AuthFailed,
    BadRequest,
    BudgetExceeded,
    ContextWindowExceeded,
    DeadlineExceeded,
    ProviderResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Usage,
)
from ksi_host.testing import FakeProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_a_completion_in_openai_shape(serve):
    provider = FakeProvider("p1", script=[ProviderResponse("hi there", Usage(7, 3, 10, 0.25, cached_tokens=2),
                                                           model="up-model", finish_reason="stop")])
    async with serve(ScriptedProviders(provider)) as s:
        raw = await s.client().chat.completions.with_raw_response.create(
            model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "k-1"})
        answer = raw.parse()
    assert raw.headers["X-KSI-Request-Id"] == "k-1"
    assert answer.id == "chatcmpl-k-1" and answer.object == "chat.completion" and answer.model == "up-model"
    assert answer.choices[0].message.content == "hi there" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 3, 10)
    assert answer.usage.prompt_tokens_details.cached_tokens == 2
    assert provider.calls[0].request_id == "k-1" and provider.calls[0].model == "m1"


async def test_a_refusal_has_null_content_as_openais_does(serve):
    provider = FakeProvider("p1", script=[ProviderResponse("", refusal="I can't help with that", finish_reason="stop")])
    async with serve(ScriptedProviders(provider)) as s:
        answer = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    message = answer.choices[0].message
    assert message.refusal == "I can't help with that" and message.content is None


LOGPROBS = {"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105],
                         "top_logprobs": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105]}]}], "refusal": None}


async def test_log_probabilities_are_in_the_choice_when_the_upstream_sent_them(serve):
    provider = FakeProvider("p1", script=[ProviderResponse("hi", logprobs=LOGPROBS), "no probabilities"])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        asked = await client.chat.completions.create(model="m1", messages=MESSAGES, logprobs=True, top_logprobs=1)
        plain = await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert asked.choices[0].logprobs.model_dump() == LOGPROBS and provider.calls[0].top_logprobs == 1
    assert plain.choices[0].logprobs is None


async def test_the_answer_says_the_upstreams_system_fingerprint(serve):
    provider = FakeProvider("p1", script=[ProviderResponse("hi", system_fingerprint="fp_44709d6fcb"), "none said"])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        said = await client.chat.completions.create(model="m1", messages=MESSAGES, seed=7,
                                                    extra_headers={"Idempotency-Key": "fp-1"})
        again = await client.chat.completions.create(model="m1", messages=MESSAGES, seed=7,  # the stored result
                                                     extra_headers={"Idempotency-Key": "fp-1"})
        plain = await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert said.system_fingerprint == again.system_fingerprint == "fp_44709d6fcb" and len(provider.calls) == 2
    assert plain.system_fingerprint is None

async def test_the_openai_client_reads_the_request_id_of_answers_errors_and_streams(serve):
    """x-request-id is where the openai client reads a response's request id (``_request_id``, an error's
    ``request_id``, a raw response's ``request_id``), as OpenAI sends it: here the id GET /v1/requests/{id} takes."""
    provider = FakeProvider("p1", script=["fine", BadRequest("the upstream said no"), "streamed",
                                          BadRequest("no stream either")])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        answer = await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "k-2"})
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "k-3"})
        raw = await client.chat.completions.with_raw_response.create(model="m1", messages=MESSAGES, stream=True,
                                                                     extra_headers={"Idempotency-Key": "k-4"})
        chunks = [c async for c in raw.parse()]
        with pytest.raises(openai.BadRequestError) as failed_stream:
            await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True,
                                                 extra_headers={"Idempotency-Key": "k-5"})
    assert answer._request_id == "k-2" and e.value.request_id == "k-3"
    assert raw.request_id == "k-4" and chunks[0].choices[0].delta.content == "streamed"
    assert failed_stream.value.request_id == "k-5"
    assert failed_stream.value.response.headers["X-KSI-Request-Id"] == "k-5"


async def test_headers_set_the_host_fields(serve):
    provider = FakeProvider("p1")
    async with serve(ScriptedProviders(provider)) as s:
        await s.client(default_headers={"X-KSI-Session-Id": "s-7", "X-KSI-Agent-Id": "writer"}).chat.completions.create(
            model="m1", messages=MESSAGES, temperature=0.5, max_tokens=20, user="u1", metadata={"k": "v"},
            extra_headers={"X-KSI-Originator-Agent-Id": "boss", "X-KSI-Purpose": "draft", "X-KSI-Priority": "high"})
    r = provider.calls[0]
    assert (r.session_id, r.agent_id, r.originator_agent_id, r.purpose, r.priority) == ("s-7", "writer", "boss", "draft",
                                                                                         "high")
    assert (r.temperature, r.max_tokens, r.user, r.metadata) == (0.5, 20, "u1", {"k": "v"})


async def test_every_reasoning_effort_of_the_openai_client_is_taken(serve):
    efforts = typing.get_args(typing.get_args(openai.types.ReasoningEffort)[0])  # Optional[Literal[...]]
    assert {"low", "high", "xhigh", "max"} <= set(efforts)
    provider = FakeProvider("p1")
    async with serve(ScriptedProviders(provider)) as s:
        for effort in efforts:
            await s.client().chat.completions.create(model="m1", messages=MESSAGES, reasoning_effort=effort)
    assert [r.reasoning_effort for r in provider.calls] == list(efforts)


async def test_openai_parameters_the_host_has_no_field_for_reach_the_provider_as_given(serve):
    provider = FakeProvider("p1")
    moderation = {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}}
    async with serve(ScriptedProviders(provider)) as s:
        await s.client().chat.completions.create(model="m1", messages=MESSAGES, prompt_cache_retention="24h",
                                                 prompt_cache_options={"ttl": "30m"}, moderation=moderation)
        await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert provider.calls[0].provider_options == {"prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "30m"},
                                                  "moderation": moderation}
    assert provider.calls[1].provider_options is None
    body = b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}], "prompt_cache_options": {"ttl": [1e999]}}'
    async with serve(ScriptedProviders(provider)) as s, aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/chat/completions", data=body) as resp:  # checked as JSON; named as it came
            error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "prompt_cache_options.ttl[0]"
    assert error["message"].startswith("prompt_cache_options.ttl[0]: must be a finite number")


async def test_a_request_without_a_key_gets_an_id_of_its_own(serve):
    provider = FakeProvider("p1")
    async with serve(ScriptedProviders(provider)) as s:
        a = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
        b = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert a.id != b.id and a.id.startswith("chatcmpl-") and len(provider.calls) == 2


async def test_the_same_key_is_answered_once_upstream(serve):
    provider = FakeProvider("p1", script=["first", "second"])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        a = await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "same"})
        b = await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"X-KSI-Request-Id": "same"})
    assert a.choices[0].message.content == b.choices[0].message.content == "first"
    assert len(provider.calls) == 1


async def test_two_keys_that_disagree_are_refused(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s:
        with pytest.raises(openai.BadRequestError) as e:
            await s.client().chat.completions.create(model="m1", messages=MESSAGES,
                                                     extra_headers={"Idempotency-Key": "a", "X-KSI-Request-Id": "b"})
    assert e.value.body["param"] == "Idempotency-Key" and e.value.body["code"] == "invalid_request_id"


async def test_a_key_with_spaces_is_refused(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s:
        with pytest.raises(openai.BadRequestError) as e:
            await s.client().chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "a b"})
    assert e.value.body["param"] == "Idempotency-Key"


async def test_bad_input_names_the_field(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s:
        client = s.client()
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m1", messages=[{"role": "wizard", "content": "x"}])
        assert e.value.status_code == 400 and e.value.body["param"] == "messages[0].role"
        assert e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"X-KSI-Priority": "urgent"})
        assert e.value.body["param"] == "X-KSI-Priority"
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m1", messages=MESSAGES, extra_body={"functions": []})
        assert e.value.body["param"] == "functions" and e.value.body["code"] == "unknown_parameter"
        with pytest.raises(openai.BadRequestError) as e:  # the host's own fields ride in headers, never in the body
            await client.chat.completions.create(model="m1", messages=MESSAGES, extra_body={"request_id": "x"})
        assert e.value.body["param"] == "request_id"
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m1", messages=MESSAGES, temperature=7)
        assert e.value.body["param"] == "temperature"


async def test_a_body_that_is_not_json_gets_400(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s, aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/chat/completions", data=b"{not json") as resp:
            body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "invalid_json"
        async with http.post(f"{s.url}/chat/completions", json=[1, 2]) as resp:
            body = await resp.json()
        assert resp.status == 400 and "JSON object" in body["error"]["message"]


async def test_a_tool_call_round_trip(serve):
    weather = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

    async def answer(request):
        last = request.messages[-1]
        assert last["role"] == "tool" and last["tool_call_id"] == "call_1"
        return ProviderResponse(f"it is {last['content']} in Oslo", Usage(20, 6, 26), finish_reason="stop")

    provider = FakeProvider("p1", script=[ProviderResponse("", Usage(10, 5, 15), tool_calls=[call],
                                                           finish_reason="tool_calls"), answer])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        messages = [{"role": "user", "content": "weather in Oslo?"}]
        first = await client.chat.completions.create(model="m1", messages=messages, tools=[weather], tool_choice="auto")
        assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
        (tool_call,) = first.choices[0].message.tool_calls
        assert tool_call.id == "call_1" and json.loads(tool_call.function.arguments) == {"city": "Oslo"}
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny"}]
        second = await client.chat.completions.create(model="m1", messages=messages, tools=[weather])
    assert second.choices[0].message.content == "it is sunny in Oslo"
    assert provider.calls[0].tools[0]["function"]["name"] == "get_weather" and provider.calls[0].tool_choice == "auto"
    assert provider.calls[1].messages[1]["tool_calls"][0]["id"] == "call_1"


async def test_a_message_from_the_openai_helpers_is_taken_back_as_it_came(serve):
    """The openai client's ``.parse()`` and ``.stream()`` helpers give messages with response fields (``parsed``,
    ``annotations``, a tool call's ``index``, its function's ``parsed_arguments``); an agent appends them to its
    messages as they came, and OpenAI takes them. They are dropped; the rest of the message reaches the provider."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

    class get_weather(pydantic.BaseModel):  # noqa: N801 (the tool's name)
        city: str

    tool = openai.pydantic_function_tool(get_weather)
    calling = ProviderResponse("", tool_calls=[call], finish_reason="tool_calls")
    provider = FakeProvider("p1", script=[calling, calling, "sunny", "rainy"])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        parsed = await client.chat.completions.parse(model="m1", messages=MESSAGES, tools=[tool])
        async with client.chat.completions.stream(model="m1", messages=MESSAGES, tools=[tool]) as stream:
            streamed = await stream.get_final_completion()
        answers = []
        for first in (parsed, streamed):
            message = first.choices[0].message
            assert message.tool_calls[0].function.parsed_arguments == get_weather(city="Oslo")
            answer = await client.chat.completions.create(model="m1", tools=[tool], messages=[
                *MESSAGES, message, {"role": "tool", "tool_call_id": "call_1", "content": "done"}])
            answers.append(answer.choices[0].message.content)
    assert answers == ["sunny", "rainy"]
    for request in provider.calls[2:]:
        sent = request.messages[1]
        assert sent["role"] == "assistant" and sent["tool_calls"] == [call]
        assert not {"parsed", "annotations"} & set(sent) and request.messages[2]["content"] == "done"


@pytest.mark.parametrize(("error", "status", "kind", "code"), [
    (BadRequest("the upstream said no"), 400, "invalid_request_error", "upstream_bad_request"),
    (ContextWindowExceeded("too long"), 400, "invalid_request_error", "context_length_exceeded"),
    (AuthFailed("bad upstream key"), 502, "upstream_error", "upstream_auth_failed"),
    (RateLimited("slow down", retry_after=3.0), 429, "rate_limit_error", "rate_limit_exceeded"),
    (BudgetExceeded("budget spent"), 429, "insufficient_quota", "insufficient_quota"),
    (ProviderTimeout("no answer"), 504, "timeout_error", "upstream_timeout"),
    (DeadlineExceeded("too late"), 504, "timeout_error", "deadline_exceeded"),
    (ProviderUnavailable("down"), 502, "upstream_error", "upstream_unavailable"),
])
async def test_final_errors_map_to_openai_statuses(serve, error, status, kind, code):
    async with serve(ScriptedProviders(FakeProvider("p1", script=[error]))) as s, aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/chat/completions", json={"model": "m1", "messages": MESSAGES}) as resp:
            body = await resp.json()
            headers = resp.headers
    assert resp.status == status
    assert body["error"]["type"] == kind and body["error"]["code"] == code and error.message in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert headers["x-should-retry"] == "false"  # the host retried as its policy says; the same id gets the same answer
    assert ("Retry-After" in headers) == (status == 429)


@pytest.mark.parametrize(("kind", "status", "code"), [
    ("ConsumerGone", 409, "request_cancelled"),  # a Cancelled: another consumer of a stream left
    ("DatabaseStartupError", 503, "database_error"),  # a DatabaseError
    ("SomePluginsOwnError", 500, None),  # a type the host does not define
])
def test_error_types_map_by_their_nearest_known_base(kind, status, code):
    from ksi_serve.wire import result_error

    from ksi_host import CompletionResult

    error = result_error(CompletionResult("r", "error", error={"type": kind, "message": "m"}), 1)
    assert (error.status, error.code) == (status, code) and error.message == f"{kind}: m"


async def test_a_model_nothing_serves_is_404_model_not_found(serve):
    async with serve(ScriptedProviders(FakeProvider("p1", model="gpt-*"))) as s:
        with pytest.raises(openai.NotFoundError) as e:
            await s.client().chat.completions.create(model="llama", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"


async def test_a_programming_error_answers_500_and_is_reported(serve):
    async with serve(ScriptedProviders(FakeProvider("p1", script=[KeyError("bug")]))) as s:
        with pytest.raises(openai.InternalServerError) as e:
            await s.client().chat.completions.create(model="m1", messages=MESSAGES)
        assert e.value.status_code == 500
        assert [type(c) for c in s.crashes] == [KeyError]


async def test_a_client_that_leaves_does_not_cancel_its_request(serve):
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return ProviderResponse("late but stored", Usage(1, 1, 2))

    provider = FakeProvider("p1", script=[slow])
    async with serve(ScriptedProviders(provider)) as s:
        with pytest.raises(openai.APITimeoutError):
            await s.client(timeout=0.3).chat.completions.create(model="m1", messages=MESSAGES,
                                                                extra_headers={"Idempotency-Key": "gone"})
        release.set()
        again = await s.client().chat.completions.create(model="m1", messages=MESSAGES,
                                                         extra_headers={"Idempotency-Key": "gone"})
    assert again.choices[0].message.content == "late but stored"
    assert len(provider.calls) == 1


async def raw_post(s, headers_and_body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A chat completion POST written as raw bytes (its last headers and body given) on a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(s.base.rsplit(":", 1)[1]))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers_and_body)
    await writer.drain()
    return reader, writer


async def test_a_client_that_leaves_before_the_end_of_its_body_is_no_programming_error(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s:
        _, writer = await raw_post(s, b'Content-Length: 1000\r\n\r\n{"model": "m1", ')
        await until(lambda: s.server.pending == 1)  # the body is being read
        writer.close()
        await until(lambda: s.server.pending == 0)
        answer = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert s.crashes == []  # (before: a ConnectionResetError answered 500 and stopped the server, exit 70)
    assert s.server.metrics.http[("/v1/chat/completions", 400)] == 1 and answer.choices[0].message.content == "ok"


async def test_a_malformed_chunked_body_is_a_bad_request_not_a_programming_error(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s:
        reader, writer = await raw_post(s, b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\nzz-not-a-size\r\n')
        head = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        answer = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert s.crashes == [] and head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), head  # (aiohttp's own answer)
    assert answer.choices[0].message.content == "ok"


@pytest.mark.parametrize("body", [
    b'{"\\ud800": 1, "model": "m1", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "m1", "messages": [{"role": "user", "content": "hi", "\\udfff": 1}]}',
])
async def test_a_key_that_is_not_unicode_is_a_400_naming_it_escaped(serve, body):
    # found by fuzzing: the key (a lone surrogate, which JSON's escapes can carry) came back in the error, which could
    # not be encoded: aiohttp answered a plain-text 500
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s, aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/chat/completions", data=body, headers={"Content-Type": "application/json"}) as resp:
            error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] in ("\\ud800", "messages[0].\\udfff"), error
    assert s.crashes == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_a_400_not_a_programming_error(serve, encoding):
    # found by fuzzing: aiohttp's RequestPayloadError from request.read() was taken for a programming error: 500, the
    # server stopped, exit 70: any client could stop it with one header
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s, aiohttp.ClientSession() as http:
        async with http.post(f"{s.url}/chat/completions", data=b'{"model": "m1"}',
                             headers={"Content-Encoding": encoding, "Content-Type": "application/json"}) as resp:
            error = (await resp.json())["error"]
        answer = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert resp.status == 400 and error["code"] == "invalid_body" and error["param"] == "Content-Encoding", error
    assert s.crashes == [] and answer.choices[0].message.content == "ok"
