"""``stream: true``: server-sent events through the stock openai client."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from ksi_host import ChatDelta, NoProviderError, ProviderUnavailable, Usage
from ksi_host.testing import FakeStreamingProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_pieces_arrive_as_chunks_then_usage_then_done(serve):
    provider = FakeStreamingProvider("p1", script=[["Hel", "lo", " world"]], usage=Usage(4, 3, 7))
    async with serve(ScriptedProviders(provider)) as s:
        stream = await s.client().chat.completions.create(model="m1", messages=MESSAGES, stream=True,
                                                          stream_options={"include_usage": True},
                                                          extra_headers={"Idempotency-Key": "st-1"})
        chunks = [c async for c in stream]
        async with aiohttp.ClientSession() as http:  # the raw events: the last one is [DONE]
            async with http.post(f"{s.url}/chat/completions", json={"model": "m1", "messages": MESSAGES, "stream": True},
                                 headers={"Idempotency-Key": "st-2"}) as resp:
                raw = await resp.text()
                content_type = resp.headers["Content-Type"]
    assert [c.choices[0].delta.content for c in chunks if c.choices] == ["Hel", "lo", " world", None]
    assert chunks[0].choices[0].delta.role == "assistant" and {c.id for c in chunks} == {"chatcmpl-st-1"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    assert content_type.startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n") and raw.count("data: ") == 5  # 3 pieces, the finish, [DONE]


def entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


async def test_each_chunk_carries_the_log_probabilities_of_its_piece(serve):
    pieces = [ChatDelta("Hel", logprobs={"content": [entry("Hel", -0.1)], "refusal": None}),
              ChatDelta("lo", logprobs={"content": [entry("lo", -0.2)], "refusal": None}), ChatDelta(finish_reason="stop")]
    provider = FakeStreamingProvider("p1", script=[pieces, ["plain"]])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        chunks = [c async for c in await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, logprobs=True, extra_headers={"Idempotency-Key": "lp-s"})]
        again = [c async for c in await client.chat.completions.create(  # the stored result, in one piece
            model="m1", messages=MESSAGES, stream=True, logprobs=True, extra_headers={"Idempotency-Key": "lp-s"})]
        plain = [c async for c in await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)]
    assert [(c.choices[0].delta.content, c.choices[0].logprobs and c.choices[0].logprobs.model_dump()) for c in chunks] == [
        ("Hel", {"content": [entry("Hel", -0.1)], "refusal": None}),
        ("lo", {"content": [entry("lo", -0.2)], "refusal": None}), (None, None)]
    assert [c.choices[0].logprobs.model_dump() for c in again] == [{"content": [entry("Hel", -0.1), entry("lo", -0.2)],
                                                                    "refusal": None}]
    assert [c.choices[0].logprobs for c in plain] == [None, None]


async def test_each_chunk_says_the_upstreams_last_system_fingerprint(serve):
    pieces = [ChatDelta("Hel", system_fingerprint="fp_old"), ChatDelta("lo"), ChatDelta("!", system_fingerprint="fp_new"),
              ChatDelta(finish_reason="stop", usage=Usage(4, 3, 7))]
    provider = FakeStreamingProvider("p1", script=[pieces, ["plain"]])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        asked = {"model": "m1", "messages": MESSAGES, "stream": True, "seed": 7, "stream_options": {"include_usage": True}}
        chunks = [c async for c in await client.chat.completions.create(**asked, extra_headers={"Idempotency-Key": "fp-s"})]
        again = [c async for c in await client.chat.completions.create(  # the stored result, in one piece
            **asked, extra_headers={"Idempotency-Key": "fp-s"})]
        plain = [c async for c in await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)]
    assert [(c.choices[0].delta.content if c.choices else "usage", c.system_fingerprint) for c in chunks] == [
        ("Hel", "fp_old"), ("lo", "fp_old"), ("!", "fp_new"), (None, "fp_new"), ("usage", "fp_new")]
    assert [c.system_fingerprint for c in again] == ["fp_new", "fp_new"] and again[0].choices[0].delta.content == "Hello!"
    assert [c.system_fingerprint for c in plain] == [None, None]

async def test_a_failure_before_the_first_piece_is_an_http_error(serve):
    provider = FakeStreamingProvider("p1", script=[NoProviderError("no such model here")])
    async with serve(ScriptedProviders(provider)) as s:
        with pytest.raises(openai.NotFoundError) as e:
            await s.client().chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    assert e.value.body["code"] == "model_not_found"


async def test_a_failure_after_the_first_piece_is_an_error_event_never_a_clean_end(serve):
    provider = FakeStreamingProvider("p1", script=[["partial ", ProviderUnavailable("upstream went away")]])
    async with serve(ScriptedProviders(provider)) as s:
        stream = await s.client().chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        got = []
        with pytest.raises(openai.APIError) as e:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{s.url}/chat/completions",
                                 json={"model": "m1", "messages": MESSAGES, "stream": True}) as resp:
                raw = await resp.text()
    assert got == ["partial "] and "upstream went away" in str(e.value)
    assert '"error"' in raw and "[DONE]" not in raw


async def test_a_streamed_tool_call(serve):
    pieces = [ChatDelta(tool_calls=[{"index": 0, "id": "call_9", "type": "function",
                                     "function": {"name": "lookup", "arguments": ""}}]),
              ChatDelta(tool_calls=[{"index": 0, "function": {"arguments": '{"q": '}}]),
              ChatDelta(tool_calls=[{"index": 0, "function": {"arguments": '"ksi"}'}}]),
              ChatDelta(finish_reason="tool_calls", usage=Usage(5, 5, 10))]
    provider = FakeStreamingProvider("p1", script=[pieces])
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    async with serve(ScriptedProviders(provider)) as s:
        stream = await s.client().chat.completions.create(model="m1", messages=MESSAGES, tools=[tool], stream=True)
        chunks = [c async for c in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_9" and calls[0].function.name == "lookup"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"q": "ksi"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_a_stream_whose_client_leaves_finishes_and_is_stored(serve):
    gate = asyncio.Event()
    # after the client left, the pieces keep coming, slowly enough for a write to find the connection gone
    pieces = ["first ", gate.wait(), "a", asyncio.sleep(0.1), "b", asyncio.sleep(0.1), "c", asyncio.sleep(0.1), "d"]
    provider = FakeStreamingProvider("p1", script=[pieces])
    async with serve(ScriptedProviders(provider)) as s:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{s.url}/chat/completions", json={"model": "m1", "messages": MESSAGES, "stream": True},
                                   headers={"Idempotency-Key": "left"})
            await resp.content.readuntil(b"\n\n")  # the first piece came: now leave
            resp.close()
        gate.set()
        again = await s.client().chat.completions.create(model="m1", messages=MESSAGES,
                                                         extra_headers={"Idempotency-Key": "left"})
    assert again.choices[0].message.content == "first abcd"
    assert len(provider.calls) == 1 and provider.closed == 0  # the upstream stream was never cut


async def test_a_retry_while_the_first_stream_is_still_open_gets_the_answer_once(serve):
    gate = asyncio.Event()
    provider = FakeStreamingProvider("p1", script=[["one ", gate.wait(), "two"]])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        first = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True,
                                                     extra_headers={"Idempotency-Key": "dup"})
        second = asyncio.ensure_future(client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, extra_headers={"Idempotency-Key": "dup"}))
        await asyncio.sleep(0.1)
        gate.set()
        text_one = "".join([c.choices[0].delta.content or "" async for c in first if c.choices])
        text_two = "".join([c.choices[0].delta.content or "" async for c in await second if c.choices])
    assert text_one == text_two == "one two" and len(provider.calls) == 1


async def test_a_programming_error_after_the_first_piece_is_an_error_event_and_is_reported(serve):
    provider = FakeStreamingProvider("p1", script=[["partial ", KeyError("bug mid-stream")]])
    async with serve(ScriptedProviders(provider)) as s:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{s.url}/chat/completions",
                                 json={"model": "m1", "messages": MESSAGES, "stream": True}) as resp:
                status, raw = resp.status, await resp.text()
    assert status == 200 and raw.startswith("data: ") and '"partial "' in raw
    events = [line for line in raw.split("\n\n") if line]
    assert '"server_error"' in events[-1] and "[DONE]" not in raw  # an error event, never a clean end
    assert [type(c) for c in s.crashes] == [KeyError]
