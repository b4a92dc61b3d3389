"""``ksi-host serve`` as a subprocess, called with the stock ``openai`` client (sync and async), over the real
queue, retry, ledger and openai provider plugins and the local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from ksi_serve.testing import ServeProcess, toml

from ksi_host.testing.server import SYSTEM_FINGERPRINT, OpenAIServer, logprob_entries

PLUGINS = "queue,openai,retry,tokens,serve"
TOKEN = "it-token-0123456789abcdef"


def environment(plugins: str = PLUGINS, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(KSI_HOST_PLUGINS=plugins, LITELLM_LOCAL_MODEL_COST_MAP="True", OTEL_TRACES_EXPORTER="none",
               KSI_IT_TOKEN=TOKEN, **extra)
    return env


def write_config(path: Path, upstream: OpenAIServer, **tables: Any) -> Path:
    config = {
        "queue": {"concurrency": 8},
        "retry": {"base_delay_s": 0.05, "max_delay_s": 0.5, "max_attempts": 5, "seed": 1},
        "openai": {"deployments": [{"name": "local", "model": "gpt-*", "api_base": upstream.url, "timeout_s": 10.0}]},
        **tables,
    }
    path.write_text(toml(config))
    return path


@pytest.fixture
def upstream() -> Iterator[OpenAIServer]:
    server = OpenAIServer(delay_s=0.005, keep_bodies=True).start_in_thread()
    try:
        yield server
    finally:
        server.stop_thread()


@pytest.fixture
def served(tmp_path: Path, upstream: OpenAIServer) -> Iterator[ServeProcess]:
    with ServeProcess(write_config(tmp_path / "ksi.toml", upstream), tmp_path / "ksi.db", env=environment()) as s:
        yield s
    assert s.returncode == 0, s.log()


def ledger(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM token_usage ORDER BY id")]
    finally:
        con.close()


def test_a_completion_with_the_sync_and_the_async_client(served: ServeProcess, upstream: OpenAIServer):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello sync"}],
                                            extra_headers={"X-KSI-Session-Id": "s1", "X-KSI-Agent-Id": "it-agent"})

    async def call() -> Any:
        async with openai.AsyncOpenAI(base_url=served.url, api_key="unused", max_retries=0) as aclient:
            return await aclient.chat.completions.create(model="gpt-4o-mini",
                                                         messages=[{"role": "user", "content": "hello async"}])

    second = asyncio.run(call())
    assert answer.choices[0].message.content == "echo: hello sync" and answer.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "echo: hello async"
    assert answer.usage.total_tokens == upstream.arrivals[0].usage["total_tokens"]
    assert upstream.hits == 2
    served.stop()
    rows = ledger(served.db)  # the ledger has both calls, with the agent the header named
    assert [r["outcome"] for r in rows] == ["ok", "ok"] and rows[0]["agent_id"] == "it-agent"


def test_streaming(served: ServeProcess):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "stream this"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: stream this"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_log_probabilities_come_back_when_asked(served: ServeProcess, upstream: OpenAIServer):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "say it"}]
    asked = client.chat.completions.create(model="gpt-4o-mini", messages=messages, logprobs=True, top_logprobs=2,
                                           extra_headers={"Idempotency-Key": "lp-1"})
    again = client.chat.completions.create(model="gpt-4o-mini", messages=messages, logprobs=True, top_logprobs=2,
                                           extra_headers={"Idempotency-Key": "lp-1"})  # answered from the store
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    content = asked.choices[0].logprobs.content
    assert [t.token for t in content] == ["echo: ", "say ", "it"] and [len(t.top_logprobs) for t in content] == [2, 2, 2]
    assert [t.model_dump() for t in content] == logprob_entries("echo: say it", 2)
    assert again.choices[0].logprobs == asked.choices[0].logprobs and upstream.hits == 2
    assert plain.choices[0].logprobs is None
    assert upstream.arrivals[0].body["logprobs"] is True and upstream.arrivals[0].body["top_logprobs"] == 2


def test_a_streams_chunks_carry_their_log_probabilities(served: ServeProcess, upstream: OpenAIServer):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "stream it"}]
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, logprobs=True,
                                                 top_logprobs=1, extra_headers={"Idempotency-Key": "lp-s"}))
    again = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, logprobs=True,
                                                top_logprobs=1, extra_headers={"Idempotency-Key": "lp-s"}))
    plain = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert [c.choices[0].logprobs.content[0].token for c in with_text] == [c.choices[0].delta.content for c in with_text]
    assert [t.model_dump() for c in with_text for t in c.choices[0].logprobs.content] == logprob_entries("echo: stream it", 1)
    [whole] = again  # the stored result, in one piece, with all of them
    assert [t.model_dump() for t in whole.choices[0].logprobs.content] == logprob_entries("echo: stream it", 1)
    assert all(c.choices[0].logprobs is None for c in plain if c.choices) and upstream.hits == 2


def test_the_upstreams_system_fingerprint_comes_back_whole_and_streamed(served: ServeProcess, upstream: OpenAIServer):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "which backend"}]
    whole = client.chat.completions.create(model="gpt-4o-mini", messages=messages, seed=7,
                                           extra_headers={"Idempotency-Key": "fp-1"})
    again = client.chat.completions.create(model="gpt-4o-mini", messages=messages, seed=7,
                                           extra_headers={"Idempotency-Key": "fp-1"})  # answered from the store
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, seed=7, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_headers={"Idempotency-Key": "fp-s"}))
    stored = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, seed=7, stream=True,
                                                 extra_headers={"Idempotency-Key": "fp-s"}))
    upstream.system_fingerprint = None  # an upstream that says none
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    plain_chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    assert whole.system_fingerprint == again.system_fingerprint == SYSTEM_FINGERPRINT and upstream.hits == 4
    assert len(chunks) > 3 and {c.system_fingerprint for c in chunks} == {SYSTEM_FINGERPRINT}
    assert [c.system_fingerprint for c in stored] == [SYSTEM_FINGERPRINT]
    assert plain.system_fingerprint is None and {c.system_fingerprint for c in plain_chunks} == {None}


def test_two_sessions_from_several_client_tasks_reach_the_upstream_in_order(served: ServeProcess,
                                                                            upstream: OpenAIServer):
    upstream.delay_s = 0.02
    per_task = 6

    async def task(t: int, client: openai.AsyncOpenAI) -> None:
        for i in range(per_task):
            session = "sA" if (t + i) % 2 == 0 else "sB"
            rid = f"t{t}-{i}"
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"{session} {rid}"}],
                                                 extra_headers={"X-KSI-Session-Id": session, "Idempotency-Key": rid})

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=served.url, api_key="unused", max_retries=0) as client:
            await asyncio.gather(*(task(t, client) for t in range(4)))

    asyncio.run(main())
    served.stop()
    con = sqlite3.connect(served.db)
    accepted: dict[str, list[str]] = defaultdict(list)  # session -> request ids in the order the queue took them
    for sid, rid in con.execute("SELECT session_id, request_id FROM ksi_queue_requests ORDER BY seq"):
        accepted[sid].append(rid)
    con.close()
    arrived: dict[str, list[Any]] = defaultdict(list)
    for a in sorted(upstream.arrivals, key=lambda a: a.t):
        session, rid = a.body["messages"][-1]["content"].split()
        arrived[session].append((rid, a.t, a.answered_at))
    assert set(arrived) == {"sA", "sB"} and sum(len(v) for v in arrived.values()) == 4 * per_task
    for session, calls in arrived.items():
        assert [rid for rid, _, _ in calls] == accepted[session], session  # the upstream saw each session in order
        for (_, _, answered), (rid, t, _) in zip(calls, calls[1:], strict=False):
            assert t >= answered, f"{session}: {rid} reached the upstream before the one before it was answered"


def test_a_retried_post_with_the_same_key_is_answered_once_upstream(served: ServeProcess, upstream: OpenAIServer):
    upstream.delay_s = 1.5  # the client gives up after 0.4 s and sends the same POST again, same headers
    client = openai.OpenAI(base_url=served.url, api_key="unused", timeout=0.4, max_retries=8)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "only once"}],
                                            extra_headers={"Idempotency-Key": "retry-me"})
    assert answer.choices[0].message.content == "echo: only once" and answer.id == "chatcmpl-retry-me"
    assert upstream.hits == 1
    served.stop()
    assert len(ledger(served.db)) == 1


def test_a_request_cancelled_mid_call_shows_the_attempt_that_failed_and_the_one_cut_short(served: ServeProcess,
                                                                                          upstream: OpenAIServer):
    """GET /v1/requests/{id} of a request cancelled while its second call was held upstream: its result lists both
    attempts, in order, with the provider, as the ledger's calls section lists both calls."""
    upstream.script("500", "hold")
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(client.chat.completions.create, model="gpt-4o-mini",
                            messages=[{"role": "user", "content": "cut me short"}],
                            extra_headers={"Idempotency-Key": "cut-short"})
        deadline = time.monotonic() + 30
        while upstream.holding == 0:
            assert time.monotonic() < deadline and not asked.done(), "the second call never reached the upstream"
            time.sleep(0.01)
        assert client.post("/requests/cut-short/cancel", cast_to=object)["cancelled"] is True
        with pytest.raises(openai.ConflictError):
            asked.result(30)
    details = client.get("/requests/cut-short", cast_to=object)
    result = details["result"]
    assert result["status"] == "cancelled" and result["provider"] == "local"
    assert [(a["number"], a["provider"], a["error_type"]) for a in result["attempts"]] == [
        (1, "local", "ProviderUnavailable"), (2, "local", "Cancelled")]
    assert len(details["calls"]) == 2 and upstream.hits == 2


def test_without_a_valid_key_401(tmp_path: Path, upstream: OpenAIServer):
    config = write_config(tmp_path / "ksi.toml", upstream, serve={"clients": [{"name": "it", "key_env": "KSI_IT_TOKEN"}]})
    with ServeProcess(config, tmp_path / "ksi.db", env=environment()) as served:
        for key in ("wrong-token-0123456789abcdef", TOKEN[:-1]):
            with pytest.raises(openai.AuthenticationError) as e:
                openai.OpenAI(base_url=served.url, api_key=key, max_retries=0).chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "let me in"}])
            assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url, api_key="x", max_retries=0).models.list()
        assert upstream.hits == 0
        answer = openai.OpenAI(base_url=served.url, api_key=TOKEN, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "with the key"}])
    assert answer.choices[0].message.content == "echo: with the key"
    assert TOKEN not in served.log() and TOKEN.encode() not in served.db.read_bytes()


TOOLBOX = '''
from ksi_host import ProviderInfo, ProviderResponse, Usage, hookimpl


class ToolProvider:
    """Answers like a model with tools: a call of the first tool, then what the tool's result said."""

    name, timeout_s = "toolbox", 10.0

    async def complete(self, request, *, timeout_s):
        if request.model == "toolbox/bug":
            raise KeyError("a bug in the toolbox")
        last = request.messages[-1]
        if last["role"] == "tool":
            return ProviderResponse(f"the tool said: {last['content']}", Usage(9, 4, 13), finish_reason="stop")
        function = request.tools[0]["function"]["name"]
        call = {"id": "call_1", "type": "function", "function": {"name": function, "arguments": '{"city": "Oslo"}'}}
        return ProviderResponse("", Usage(8, 6, 14), tool_calls=[call], finish_reason="tool_calls")


class Plugin:
    @hookimpl
    def ksi_select_provider(self, request, exclude):
        if request.model.startswith("toolbox/") and "toolbox" not in exclude:
            return ToolProvider()

    @hookimpl
    def ksi_list_providers(self, model):
        return [ProviderInfo("toolbox", "toolbox/*", "toolbox")] if model in (None,) or model.startswith("toolbox/") else []
'''


def fake_plugin(where: Path) -> Path:
    """The toolbox provider plugin, installed by PYTHONPATH (a module and a dist-info with its entry point)."""
    where.mkdir()
    (where / "ksi_it_toolbox.py").write_text(textwrap.dedent(TOOLBOX))
    info = where / "ksi_it_toolbox-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ksi-it-toolbox\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ksi_host]\ntoolbox = ksi_it_toolbox:Plugin\n")
    return where


def test_a_tool_call_round_trip(tmp_path: Path, upstream: OpenAIServer):
    site = fake_plugin(tmp_path / "site")
    env = environment(PLUGINS + ",toolbox", PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    weather = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    with ServeProcess(write_config(tmp_path / "ksi.toml", upstream), tmp_path / "ksi.db", env=env) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
        messages: list[Any] = [{"role": "user", "content": "what is the weather in Oslo?"}]
        first = client.chat.completions.create(model="toolbox/m", messages=messages, tools=[weather])
        (call,) = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
        messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        second = client.chat.completions.create(model="toolbox/m", messages=messages, tools=[weather])
        stream = client.chat.completions.create(model="toolbox/m", messages=messages[:1], tools=[weather], stream=True)
        streamed = [tc for chunk in stream if chunk.choices for tc in chunk.choices[0].delta.tool_calls or ()]
    assert second.choices[0].message.content == "the tool said: sunny, 21 C"
    assert streamed[0].function.name == "get_weather" and streamed[0].index == 0


def test_a_retried_tool_call_is_answered_from_the_store_with_its_tool_calls(tmp_path: Path, upstream: OpenAIServer):
    site = fake_plugin(tmp_path / "site")
    env = environment(PLUGINS + ",toolbox", PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with ServeProcess(write_config(tmp_path / "ksi.toml", upstream), tmp_path / "ksi.db", env=env) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
        answers = [client.chat.completions.create(model="toolbox/m", messages=[{"role": "user", "content": "weather?"}],
                                                  tools=[weather], extra_headers={"Idempotency-Key": "tool-once"})
                   for _ in range(2)]
        details = client.get("/requests/tool-once", cast_to=object)
    first, again = (a.choices[0] for a in answers)
    assert again.finish_reason == first.finish_reason == "tool_calls"
    assert again.message.tool_calls == first.message.tool_calls and first.message.tool_calls[0].id == "call_1"
    assert details["state"] == "ok" and details["result"]["message"]["tool_calls"][0]["id"] == "call_1"
    assert [c["outcome"] for c in details["calls"]] == ["ok"]  # the ledger's one call


def test_a_programming_error_answers_500_and_stops_the_server_with_exit_70(tmp_path: Path, upstream: OpenAIServer):
    site = fake_plugin(tmp_path / "site")
    env = environment(PLUGINS + ",toolbox", PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    served = ServeProcess(write_config(tmp_path / "ksi.toml", upstream), tmp_path / "ksi.db", env=env).start()
    try:
        with pytest.raises(openai.InternalServerError) as e:
            openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0).chat.completions.create(
                model="toolbox/bug", messages=[{"role": "user", "content": "crash"}])
        assert e.value.status_code == 500
        assert served.wait() == 70
    finally:
        served.kill()
    log = served.log()
    assert "KeyError: 'a bug in the toolbox'" in log and "Traceback" in log and "toolbox" in log


def test_models_and_metrics(served: ServeProcess):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "count me"}])
    models = {m.id: m for m in client.models.list().data}
    assert models["gpt-*"].ksi_pattern is True and models["gpt-*"].owned_by == "openai"
    import urllib.request

    text = urllib.request.urlopen(served.base + "/metrics", timeout=10).read().decode()
    assert 'ksi_requests_total{status="ok"} 1' in text and 'ksi_attempts_total{outcome="ok"} 1' in text
    assert "ksi_queue_queued 0" in text


def _exchange(served: ServeProcess, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; what the server answers until it closes the connection."""
    import socket

    host, port = served.base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_request_aiohttp_cannot_parse_leaves_no_token_in_the_log(tmp_path: Path, upstream: OpenAIServer):
    # found by fuzzing: aiohttp logged such a request with a traceback quoting the bad header line, so a valid bearer
    # token followed by a control character (or in a line over 8190 bytes) was written to the server's log
    config = write_config(tmp_path / "ksi.toml", upstream, serve={"clients": [{"name": "it", "key_env": "KSI_IT_TOKEN"}]})
    with ServeProcess(config, tmp_path / "ksi.db", env=environment()) as served:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: Bearer " + TOKEN.encode()
        answers = [_exchange(served, head + tail + b"\r\n\r\n{}") for tail in (b"\x7f", b"x" * 9000)]
        client = openai.OpenAI(base_url=served.url, api_key=TOKEN, max_retries=0)
        ok = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "still here"}])
    assert all(a.split(b"\r\n")[0].endswith(b" 400 Bad Request") for a in answers), answers  # (aiohttp's own answer)
    assert ok.choices[0].message.content == "echo: still here" and served.returncode == 0
    log = served.log()
    assert TOKEN not in log and "Traceback" not in log, log
    assert log.count("not valid HTTP (") == 2, log  # each is still logged, as one line naming its kind


def test_an_idle_connection_closes_after_idle_timeout_s(tmp_path: Path, upstream: OpenAIServer):
    # found by fuzzing: a connection that sent nothing (or half a request line) stayed open for aiohttp's default of
    # 3630 s, each holding a file descriptor
    import time

    config = write_config(tmp_path / "ksi.toml", upstream, serve={"idle_timeout_s": 0.5})
    with ServeProcess(config, tmp_path / "ksi.db", env=environment()) as served:
        started = time.monotonic()
        nothing = _exchange(served, b"")
        half = _exchange(served, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-KSI-")
        took = time.monotonic() - started
    assert (nothing, half) == (b"", b"") and took < 8, took  # closed by the server, each well before the 10 s wait
