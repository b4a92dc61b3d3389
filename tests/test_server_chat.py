"""ksi_host.testing.server answers like a model: tool calls, tool results, JSON, usage details,
refusals, and streams (server-sent events) with their faults: cut, hold, a delay before the
first chunk, and a client that leaves early. Plain sockets and http.client, no client library."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from typing import Any

import pytest

from ksi_host.testing.server import REFUSAL, OpenAIServer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"},
                                                "unit": {"type": "string", "enum": ["c", "f"]}},
                                                "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "weather in Paris"}]


def post(server: OpenAIServer, **body: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": USER, **body}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_the_whole_body_is_logged_as_it_arrived(openai_server: OpenAIServer) -> None:
    body = {"model": "m", "messages": USER, "tools": [WEATHER], "logit_bias": {"50256": -100}, "seed": 7,
            "response_format": {"type": "json_object"}, "anything": {"nested": [1, 2.5, None]}}
    post(openai_server, **body)
    assert openai_server.arrivals[0].body == body
    conn = http.client.HTTPConnection(openai_server.host, openai_server.port, timeout=5)
    conn.request("GET", "/_ksi/arrivals")
    assert json.loads(conn.getresponse().read())[0]["body"] == body


def test_a_request_with_tools_gets_a_call_of_the_first_tool_with_arguments_from_its_schema(openai_server: OpenAIServer) -> None:
    status, data = post(openai_server, tools=[WEATHER, CLOCK])
    choice = data["choices"][0]
    assert status == 200 and choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "weather in Paris", "days": 1, "unit": "c"}
    assert data["usage"]["completion_tokens"] >= 1


def test_tool_choice_picks_the_tool_or_none(openai_server: OpenAIServer) -> None:
    _, data = post(openai_server, tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert data["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    _, data = post(openai_server, tools=[WEATHER], tool_choice="none")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "echo: weather in Paris"}
    assert data["choices"][0]["finish_reason"] == "stop"


def test_a_tool_result_gets_a_final_text(openai_server: OpenAIServer) -> None:
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    _, data = post(openai_server, messages=messages, tools=[WEATHER])
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "the tool said: sunny, 21 C"}
    assert data["choices"][0]["finish_reason"] == "stop"


def test_response_format_json_object_and_json_schema(openai_server: OpenAIServer) -> None:
    _, data = post(openai_server, response_format={"type": "json_object"})
    assert json.loads(data["choices"][0]["message"]["content"]) == {"echo": "echo: weather in Paris"}
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temps": {"type": "array", "items": {"type": "number"}},
                                               "ok": {"type": "boolean"}, "kind": {"const": "forecast"}}}
    _, data = post(openai_server, response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}})
    assert json.loads(data["choices"][0]["message"]["content"]) == {
        "city": "echo: weather in Paris", "temps": [1.5], "ok": True, "kind": "forecast"}


def test_cached_and_reasoning_tokens_when_asked() -> None:
    with OpenAIServer(cached_tokens=3) as server:
        _, plain = post(server)
        assert plain["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
        assert "completion_tokens_details" not in plain["usage"]
        conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
        conn.request("POST", "/_ksi/faults", json.dumps({"reasoning_tokens": 5, "cached_tokens": None}))
        assert conn.getresponse().read()
        _, data = post(server)
    usage = data["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 5} and "prompt_tokens_details" not in usage
    assert usage["completion_tokens"] == plain["usage"]["completion_tokens"] + 5  # reasoning counts in completion
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert server.usage()["completion_tokens"] == plain["usage"]["completion_tokens"] * 2 + 5


def test_the_refusal_fault(openai_server: OpenAIServer) -> None:
    openai_server.script("refusal")
    _, data = post(openai_server)
    assert data["choices"][0]["message"] == {"role": "assistant", "content": None, "refusal": REFUSAL}


def test_a_cut_whole_answer_stops_halfway(openai_server: OpenAIServer) -> None:
    openai_server.script("cut")
    with pytest.raises(http.client.IncompleteRead):
        post(openai_server)
    assert openai_server.arrivals[0].answered_at is None


def test_log_probabilities_one_entry_per_word_with_the_alternatives_asked(openai_server: OpenAIServer) -> None:
    _, asked = post(openai_server, logprobs=True, top_logprobs=2)
    _, bare = post(openai_server, logprobs=True)
    _, plain = post(openai_server)
    openai_server.script("refusal")
    _, refused = post(openai_server, logprobs=True)
    probs = asked["choices"][0]["logprobs"]
    assert [e["token"] for e in probs["content"]] == ["echo: ", "weather ", "in ", "Paris"] and probs["refusal"] is None
    first = probs["content"][0]
    assert first == {"token": "echo: ", "logprob": first["logprob"], "bytes": [101, 99, 104, 111, 58, 32],
                     "top_logprobs": [{"token": "echo: ", "logprob": first["logprob"], "bytes": [101, 99, 104, 111, 58, 32]},
                                      {"token": "echo:~1", "logprob": round(first["logprob"] - 1, 2),
                                       "bytes": list(b"echo:~1")}]}
    assert [e["logprob"] for e in probs["content"]] == [-0.21, -0.09, -0.54, -0.27]  # made from each word
    assert [e["top_logprobs"] for e in bare["choices"][0]["logprobs"]["content"]] == [[]] * 4  # none asked
    assert [e["logprob"] for e in bare["choices"][0]["logprobs"]["content"]] == [e["logprob"] for e in probs["content"]]
    assert plain["choices"][0]["logprobs"] is None
    refusal = refused["choices"][0]["logprobs"]
    assert refusal["content"] is None and "".join(e["token"] for e in refusal["refusal"]) == REFUSAL


# -- streams -------------------------------------------------------------------------------


class Stream:
    """One streamed request over a raw socket: the head, then the events as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head = b""
        self.events: list[str] = []
        self.times: list[float] = []

    @classmethod
    async def open(cls, server: OpenAIServer, **body: Any) -> Stream:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        data = json.dumps({"model": "m", "messages": USER, "stream": True, **body}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        self = cls(reader, writer)
        self.head = await reader.readuntil(b"\r\n\r\n")
        self.times.append(time.monotonic())
        return self

    async def next(self) -> str | None:
        """The next event's data; None at the end of the chunked body. IncompleteReadError on a cut."""
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await self.reader.readexactly(2)
            return None
        chunk = await self.reader.readexactly(size + 2)
        event = chunk[:-2].decode()
        assert event.startswith("data: ") and event.endswith("\n\n"), event
        self.events.append(event[6:-2])
        self.times.append(time.monotonic())
        return self.events[-1]

    async def rest(self) -> list[str]:
        while await self.next() is not None:
            pass
        return self.events

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    def close(self) -> None:
        self.writer.close()


async def test_a_stream_is_server_sent_events_word_by_word_ending_in_done(openai_server: OpenAIServer) -> None:
    s = await Stream.open(openai_server)
    assert b"200 OK" in s.head and b"text/event-stream" in s.head and b"chunked" in s.head.lower()
    events = await s.rest()
    s.close()
    assert events[-1] == "[DONE]"
    chunks = s.chunks()
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:-1]] == ["echo: ", "weather ", "in ", "Paris"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["stop"]
    assert all("usage" not in c for c in chunks)  # not asked for
    a = openai_server.arrivals[0]
    assert a.stream and a.chunks == 6 and not a.closed_early and a.usage is not None and a.answered_at is not None
    assert openai_server.stream_stats() == {"streams": 1, "closed_early": 0, "holding": 0}


async def test_a_streams_chunks_carry_the_log_probabilities_of_their_words(openai_server: OpenAIServer) -> None:
    s = await Stream.open(openai_server, logprobs=True, top_logprobs=1)
    await s.rest()
    s.close()
    _, whole = post(openai_server, logprobs=True, top_logprobs=1)
    chunks = s.chunks()
    assert chunks[0]["choices"][0]["logprobs"] is None and chunks[-1]["choices"][0]["logprobs"] is None  # no text
    pieces = [c["choices"][0]["logprobs"] for c in chunks[1:-1]]
    assert [p["content"][0]["token"] for p in pieces] == [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert [e for p in pieces for e in p["content"]] == whole["choices"][0]["logprobs"]["content"]  # the same entries


async def test_usage_comes_in_a_last_chunk_when_asked(openai_server: OpenAIServer) -> None:
    openai_server.cached_tokens = 2
    s = await Stream.open(openai_server, stream_options={"include_usage": True})
    await s.rest()
    s.close()
    chunks = s.chunks()
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10,
                                   "prompt_tokens_details": {"cached_tokens": 2}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and s.events[-1] == "[DONE]"


async def test_a_streamed_tool_call_comes_as_its_name_then_its_arguments_in_pieces(openai_server: OpenAIServer) -> None:
    s = await Stream.open(openai_server, tools=[WEATHER])
    await s.rest()
    s.close()
    pieces = [c["choices"][0]["delta"].get("tool_calls") for c in s.chunks()]
    calls = [p[0] for p in pieces if p]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert all(set(c) == {"index", "function"} for c in calls[1:]) and len(calls) > 2
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments)["city"] == "weather in Paris"
    assert s.chunks()[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_cut_stream_closes_after_n_chunks_without_finish_or_done(openai_server: OpenAIServer) -> None:
    openai_server.cut_after = 3
    openai_server.script("cut")
    s = await Stream.open(openai_server, stream_options={"include_usage": True})
    with pytest.raises(asyncio.IncompleteReadError):
        await s.rest()
    s.close()
    assert len(s.events) == 3 and "[DONE]" not in s.events
    assert all(c["choices"][0]["finish_reason"] is None for c in s.chunks())
    a = openai_server.arrivals[0]
    assert a.chunks == 3 and a.answered_at is None and a.usage is None


async def test_a_held_stream_waits_before_its_last_chunk_until_released(openai_server: OpenAIServer) -> None:
    openai_server.script("hold")
    s = await Stream.open(openai_server, stream_options={"include_usage": True})
    for _ in range(5):  # the role and the four words
        await s.next()
    assert openai_server.holding == 1
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await s.next()  # the chunk with the finish reason is held
    await asyncio.to_thread(openai_server.release)  # from another thread, as a test on its own loop does
    events = await s.rest()
    s.close()
    assert events[-1] == "[DONE]" and s.chunks()[-2]["choices"][0]["finish_reason"] == "stop"
    assert openai_server.holding == 0 and not openai_server.arrivals[0].closed_early


async def test_a_release_before_the_hold_lets_it_pass_and_a_hold_ends_at_hang_s(openai_server: OpenAIServer) -> None:
    openai_server.release()  # nothing held: the next hold passes at once
    openai_server.script("hold", "hold")
    s = await Stream.open(openai_server)
    async with asyncio.timeout(2):
        assert (await s.rest())[-1] == "[DONE]"
    s.close()
    openai_server.hang_s = 0.3
    t0 = time.monotonic()
    s = await Stream.open(openai_server)
    async with asyncio.timeout(5):
        assert (await s.rest())[-1] == "[DONE]"  # released by the hang_s bound
    s.close()
    assert time.monotonic() - t0 >= 0.3


def test_a_held_whole_answer_and_the_release_endpoint(openai_server: OpenAIServer) -> None:
    openai_server.script("hold")
    conn = http.client.HTTPConnection(openai_server.host, openai_server.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": USER}))
    deadline = time.monotonic() + 5
    while openai_server.holding == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    control = http.client.HTTPConnection(openai_server.host, openai_server.port, timeout=5)
    control.request("GET", "/_ksi/streams")
    assert json.loads(control.getresponse().read()) == {"streams": 0, "closed_early": 0, "holding": 1}
    control.request("POST", "/_ksi/release", "")
    assert json.loads(control.getresponse().read())["holding"] == 0
    assert json.loads(conn.getresponse().read())["choices"][0]["message"]["content"] == "echo: weather in Paris"


async def test_the_first_chunk_waits_first_chunk_delay_s_after_the_headers() -> None:
    async with OpenAIServer(first_chunk_delay_s=0.15) as server:
        s = await Stream.open(server)
        await s.rest()
        s.close()
    assert s.times[1] - s.times[0] >= 0.14  # headers at once, the first chunk after the delay
    assert s.times[-1] - s.times[1] < 0.1  # the rest without it


async def test_a_client_closing_mid_stream_is_seen_at_once_even_while_a_chunk_is_held(openai_server: OpenAIServer) -> None:
    openai_server.script("hold")
    s = await Stream.open(openai_server)
    await s.next()
    s.close()
    deadline = time.monotonic() + 2
    while openai_server.closed_early == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert openai_server.closed_early == 1 and openai_server.holding == 0
    assert openai_server.arrivals[0].closed_early and openai_server.arrivals[0].answered_at is None
    openai_server.first_chunk_delay_s = 5.0  # and while waiting for the first chunk
    s = await Stream.open(openai_server)
    s.close()
    deadline = time.monotonic() + 2
    while openai_server.closed_early == 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert openai_server.stream_stats() == {"streams": 2, "closed_early": 2, "holding": 0}


async def test_a_client_resetting_the_connection_while_a_chunk_is_held_is_seen_too(openai_server: OpenAIServer) -> None:
    # A client that closes with unread bytes in its socket makes the kernel send a reset, not an end of
    # stream: the server sees a connection error, never EOF (a close that races the server's last chunks).
    import socket
    import struct

    openai_server.script("hold")
    s = await Stream.open(openai_server)
    await s.next()
    sock = s.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    s.close()
    deadline = time.monotonic() + 2
    while openai_server.closed_early == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert openai_server.stream_stats() == {"streams": 1, "closed_early": 1, "holding": 0}


def test_the_standalone_server_takes_a_first_chunk_delay() -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0", "--first-chunk-delay", "0.2"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        t0 = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": USER, "stream": True}))
        r = conn.getresponse()
        body = r.read()
        assert time.monotonic() - t0 >= 0.2 and body.rstrip().endswith(b"data: [DONE]")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
