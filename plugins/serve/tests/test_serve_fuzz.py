"""POST /v1/chat/completions from a hostile or sloppy client (hypothesis): for any JSON body and header values, the
answer is 200 or a 4xx in the OpenAI error shape, never a 5xx; the server records no programming error and still
answers a normal call afterwards.

The examples run in a thread with a blocking HTTP client (``http.client``, which sends bytes as given) while the
server runs on the test's event loop. Bounded and derandomized: a few seconds, the same examples on every run."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ksi_serve.wire import BODY_KEYS, HEADER_FIELDS

from ksi_host.testing import FakeProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "hello"}]
ERROR_KEYS = {"message", "type", "param", "code"}

# text of every kind, lone surrogates included (JSON carries them as "\ud800"), and values at the edges of their types
odd_text = st.sampled_from(["", " ", "\ud800", "a\udfffb", "\x00", "\u2028", "é", "\U0001f600", "x" * 5000])
any_text = st.text(st.characters(blacklist_categories=()), max_size=10) | odd_text
nasty = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, 2**63, -(2**63) - 1, -1, 0, 0.0, 1e308, True, False,
                         None, "", " ", "\ud800", "a\udfffb", "\x00", "é", "x" * 5000, [], {}, [[]], {"": None}])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text | nasty
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
                           max_leaves=8)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard"]) | json_values
parts = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["text", "image_url", "input_audio", "file", "refusal", "video"]) | json_values,
    "text": st.just("hi") | json_values, "image_url": st.just({"url": "http://x/y.png"}) | json_values,
    "cache_control": json_values}) | json_values
tool_calls = st.lists(st.fixed_dictionaries({}, optional={
    "id": st.just("call_1") | json_values, "type": st.just("function") | json_values,
    "function": st.fixed_dictionaries({}, optional={"name": st.just("f") | json_values, "arguments": json_values})
    | json_values}), max_size=2) | json_values
message = st.builds(lambda fixed, extra: {**fixed, **extra}, st.fixed_dictionaries(
    {"role": roles},
    optional={"content": st.just("hi") | json_values | st.lists(parts, max_size=2), "name": json_values,
              "tool_calls": tool_calls, "tool_call_id": st.just("call_1") | json_values}),
    st.dictionaries(any_text, json_values, max_size=1) | st.just({}))
messages = st.lists(message | json_values, max_size=3)
tools = st.lists(st.fixed_dictionaries({"type": st.just("function") | json_values}, optional={
    "function": st.fixed_dictionaries({"name": st.just("f") | json_values}, optional={
        "description": json_values, "parameters": json_values, "strict": json_values}) | json_values}), max_size=2)
plausible = {  # values near the right shape, so the checks past the first are reached too
    "messages": messages, "tools": tools, "model": st.just("m1") | any_text,
    "max_tokens": st.integers(), "max_completion_tokens": st.integers(), "seed": st.integers(),
    "temperature": st.floats(), "top_p": st.floats(), "stop": st.lists(any_text, max_size=5) | any_text,
    "logit_bias": st.dictionaries(any_text | st.just("50256"), scalars, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "allowed_tools"]) | json_values}, optional={"function": json_values}),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])
                                              | json_values}, optional={"json_schema": json_values}),
    "metadata": st.dictionaries(any_text, json_values, max_size=3),
}
field_names = st.integers(0, 9).flatmap(  # mostly the parameters a body may hold; now and then an unknown one
    lambda i: st.sampled_from(sorted(BODY_KEYS)) if i < 8 else st.sampled_from(["request_id", "prompt", "functions"])
    if i == 8 else any_text)


@st.composite
def bodies(draw: Any) -> bytes:
    """A valid body with up to three fields replaced by anything (or by something near their shape); or any JSON
    value; or bytes that may not be JSON."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40) | st.sampled_from([b"", b"\xff\xfe{}", b"[" * 3000, b'{"a":' * 3000]))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = {"model": "m1", "messages": MESSAGES}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(field_names)
        body[name] = draw(plausible.get(name, json_values) | json_values)
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = draw(st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values)
    return json.dumps(body).encode()  # (NaN and Infinity as those literals, which json.loads takes)


# header values that get through HTTP parsing (no control characters, a line under aiohttp's 8190 bytes): anything
# from empty to long, non-ASCII as UTF-8 and as bytes that are not UTF-8
header_values = (st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
                 | st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=20).map(str.encode)
                 | st.sampled_from([b"", b" ", b"x" * 4000, b"critical", b"normal", b"\xed\xa0\x80", b"a,b", b"k-1", b"gzip", b"deflate", b"br"]))
header_names = st.sampled_from([*HEADER_FIELDS, "Idempotency-Key", "X-KSI-Request-Id", "Authorization", "Content-Encoding"])
good_headers = st.sampled_from([("X-KSI-Priority", b"high"), ("X-KSI-Session-Id", b"s1"), ("Idempotency-Key", b"k-1"),
                                ("X-KSI-Agent-Id", "agent-\u00e9".encode()), ("Content-Encoding", b"gzip")])
headers = st.lists(st.tuples(header_names, header_values) | good_headers, max_size=2)


def post(port: int, body: bytes, header_list: list[tuple[str, bytes]]) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        for name, value in [("Content-Type", b"application/json"), *header_list]:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type") or ""
    finally:
        conn.close()


async def test_any_body_and_headers_get_200_or_a_4xx_in_the_openai_shape_never_a_5xx(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s:
        port = int(s.base.rsplit(":", 1)[1])

        @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(bodies(), headers)
        def check(body: bytes, header_list: list[tuple[str, bytes]]) -> None:
            crashes = len(s.crashes)
            status, answer, content_type = post(port, body, header_list)
            assert s.crashes[crashes:] == [], (body, header_list, s.crashes[crashes:])
            if status == 200:
                return
            assert 400 <= status < 500, (status, answer, body, header_list)
            assert content_type.startswith("application/json"), (status, answer)
            error = json.loads(answer)["error"]
            assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"], error

        await asyncio.to_thread(check)
        after = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert after.choices[0].message.content == "ok" and s.crashes == []
