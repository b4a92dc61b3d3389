"""The chat surface of the claude CLI: what it honours (system messages, JSON response formats), what the
host refuses before any process (tools, ...), what the plugin refuses (n > 1, provider_options), what it
accepts and does not pass on; and streaming through the CLI's stream-json output (a fake ``claude``)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from fake_claude import pid_alive
from ksi_provider_claude_cli import cli

from ksi_host import BadRequest, ChatDelta, ProviderTimeout, ProviderUnavailable
from ksi_host.chat import PARAMETERS
from ksi_host.testing import UsageCalls

MODEL = "claude-cli/sonnet"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def started(host: Any) -> int:
    return sum(p.calls for p in host.pm.get_plugin("Plugin").pool)


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("extra", "lacks"), [
    ({"tools": [WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice, tools"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ["END"]}, "stop"),
    ({"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]}]},
     "image_url"),
])
async def test_what_the_cli_cannot_do_is_refused_by_the_host_before_any_process(
        cc_host: Any, fake_cli: Any, extra: dict[str, Any], lacks: str) -> None:
    req = {"model": MODEL, **({"prompt": "weather?"} if "messages" not in extra else {}), **extra}
    async with cc_host() as host:
        r = await host.complete(req)
        stream = host.stream(req)
        with pytest.raises(BadRequest, match=f"{lacks} not supported by claude-cli"):
            [d async for d in stream]
        assert started(host) == 0
    assert r.error is not None and r.error["type"] == "BadRequest"
    assert r.error["message"] == f"{lacks} not supported by claude-cli (nothing was sent)"
    assert fake_cli.calls() == []  # the fake CLI was never started


async def test_the_deployments_declare_what_they_support(cc_host: Any) -> None:
    async with cc_host(table={"deployments": [{"name": "mine", "model": "sonnet", "cli_model": "sonnet"}]}) as host:
        infos = await host.providers()
    assert {i.name: i.supports for i in infos} == {"mine": cli.SUPPORTS, "claude-cli": cli.SUPPORTS}
    assert cli.SUPPORTS < set(PARAMETERS) and "tools" not in cli.SUPPORTS


async def test_provider_options_are_refused_before_any_process(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        options = await host.complete({"model": MODEL, "prompt": "hi", "provider_options": {"max_turns": 3}})
        one = await host.complete({"model": MODEL, "prompt": "hi", "n": 1})
    assert options.error is not None and options.error["type"] == "BadRequest"
    assert options.error is not None and "provider_options (max_turns)" in options.error["message"]
    assert "extra_args" in options.error["message"]
    assert one.ok and len(fake_cli.calls()) == 1


async def test_sampling_and_limits_are_accepted_and_not_passed_on(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        r = await host.complete({"model": MODEL, "prompt": "hi", "temperature": 0.2, "max_tokens": 50, "top_p": 0.5,
                                 "seed": 3, "reasoning_effort": "low", "user": "u1"})
    assert r.ok and fake_cli.calls()[0]["argv"] == ["-p", "--output-format", "json", "--model", "sonnet"]


async def test_system_and_developer_messages_become_the_appended_system_prompt(cc_host: Any, fake_cli: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": "hi"}]
    async with cc_host() as host:
        r = await host.complete({"model": MODEL, "messages": messages})
    assert r.ok
    (call,) = fake_cli.calls()
    assert call["system"] == "Be brief.\n\nUse French." and call["prompt"] == "hi"


async def test_json_mode_is_an_instruction_and_the_answer_is_checked(cc_host: Any, fake_cli: Any) -> None:
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    async with cc_host() as host:
        obj = await host.complete({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}})
        typed = await host.complete({"model": MODEL, "prompt": "hi", "response_format": {
            "type": "json_schema", "json_schema": {"name": "echo", "schema": schema}}})
        bad = await host.complete({"model": MODEL, "prompt": "!notjson", "response_format": {"type": "json_object"}})
        plain = await host.complete({"model": MODEL, "prompt": "hi", "response_format": {"type": "text"}})
    assert obj.ok and json.loads(obj.text) == {"echo": "hi", "turn": 1}
    assert typed.ok and json.loads(typed.text)["echo"] == "hi"
    calls = fake_cli.calls()
    assert calls[0]["system"] == cli.json_instruction({"type": "json_object"})
    assert json.dumps(schema) in calls[1]["system"] and "(echo)" in calls[1]["system"]
    assert bad.error is not None and bad.error["type"] == "ProviderUnavailable"
    assert "not the JSON its response_format (json_object) asks for" in bad.error["message"]
    assert plain.ok and calls[3]["system"] is None and plain.text == "turn 1: echo: hi"


def test_check_json() -> None:
    cli.check_json("d", '{"a": 1}', {"type": "json_object"})
    cli.check_json("d", "[1, 2]", {"type": "json_schema", "json_schema": {"name": "x"}})
    cli.check_json("d", "not json", None)
    with pytest.raises(ProviderUnavailable, match="d: malformed response: the answer is JSON but not an object"):
        cli.check_json("d", "[1]", {"type": "json_object"})
    with pytest.raises(ProviderUnavailable, match="not the JSON"):
        cli.check_json("d", '```json\n{"a": 1}\n```', {"type": "json_object"})


# -- streaming ---------------------------------------------------------------------------


async def test_a_streamed_answer_comes_word_by_word_with_the_results_usage(cc_host: Any, fake_cli: Any) -> None:
    recorder = UsageCalls()
    async with cc_host(recorder) as host:
        stream = host.stream({"model": MODEL, "prompt": "one two three", "session_id": "s1"})
        pieces = [d async for d in stream]
        again = host.stream({"model": MODEL, "prompt": "four", "session_id": "s1"})
        [d async for d in again]
    assert [d.content for d in pieces[:-1]] == ["turn ", "1: ", "echo: ", "one ", "two ", "three"]
    assert pieces[-1] == ChatDelta(finish_reason="stop", usage=recorder.calls[0].usage, model="sonnet")
    r = stream.result
    assert r is not None and r.ok and r.text == "turn 1: echo: one two three" and r.finish_reason == "stop"
    assert (r.usage.completion_tokens, r.usage.cost_usd) == (6, pytest.approx(0.0123))
    first, second = fake_cli.calls()
    assert first["argv"] == ["-p", *cli.STREAM_FLAGS, "--model", "sonnet"] and first["stream"] and first["partial"]
    assert second["resume"] is None  # no continue_session: a new CLI conversation (continuity is ksi-sessions')
    assert again.result is not None and again.result.text == "turn 1: echo: four"


async def test_pieces_arrive_before_the_cli_finishes(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        stream = host.stream({"model": MODEL, "prompt": "!streamhold"})
        got = []
        async for delta in stream:
            if not got:  # the CLI waits for the release file before the rest: this piece came ahead of its end
                assert not (fake_cli.state / "release").exists()
                (fake_cli.state / "release").write_text("go")
            got.append(delta)
    assert "".join(d.content or "" for d in got) == "turn 1: echo: !streamhold"
    assert stream.result is not None and stream.result.ok


async def test_a_cli_without_partial_messages_streams_each_message_whole(cc_host: Any, fake_cli: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLAUDE_NO_PARTIAL", "1")
    async with cc_host() as host:
        stream = host.stream({"model": MODEL, "prompt": "one two"})
        pieces = [d async for d in stream]
    assert [d.content for d in pieces] == ["turn 1: echo: one two", None] and pieces[-1].finish_reason == "stop"


@pytest.mark.parametrize(("prompt", "error", "words"), [
    ("!streamcut", ProviderUnavailable, "ended without its result line (after 2 piece(s)): the answer was cut off"),
    ("!streamcrash", ProviderUnavailable, "unavailable (HTTP 529): Overloaded"),
    ("!execerror", ProviderUnavailable, "error_during_execution"),
    ("!ratelimit", Exception, "rate limited"),
])
async def test_a_stream_that_breaks_off_is_an_error(cc_host: Any, fake_cli: Any, prompt: str, error: type,
                                                    words: str) -> None:
    async with cc_host() as host:
        stream = host.stream({"model": MODEL, "prompt": prompt})
        with pytest.raises(error, match="claude-cli") as info:
            [d async for d in stream]
    assert words in str(info.value)
    assert stream.result is not None and stream.result.status == "error"


async def test_the_consumer_leaving_stops_the_process(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        stream = host.stream({"model": MODEL, "prompt": "!streamhold"})
        async for _ in stream:
            break
        pid = fake_cli.calls()[0]["pid"]
        await until(lambda: not pid_alive(pid))


async def test_a_gap_longer_than_the_timeout_stops_the_process(cc_host: Any, fake_cli: Any) -> None:
    table = {"builtin": False, "deployments": [{"name": "quick", "model": MODEL, "cli_model": "{suffix}", "timeout_s": 1}]}
    async with cc_host(table=table) as host:
        stream = host.stream({"model": MODEL, "prompt": "!streamhold"})
        with pytest.raises(ProviderTimeout, match="quick: no answer within 1s"):
            [d async for d in stream]
        pid = fake_cli.calls()[0]["pid"]
        await until(lambda: not pid_alive(pid))


async def test_a_streamed_json_answer_is_checked_too(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        good = host.stream({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}})
        [d async for d in good]
        bad = host.stream({"model": MODEL, "prompt": "!notjson", "response_format": {"type": "json_object"}})
        with pytest.raises(ProviderUnavailable, match="not the JSON"):
            [d async for d in bad]
    assert good.result is not None and json.loads(good.result.text) == {"echo": "hi", "turn": 1}


async def test_a_stream_past_the_output_cap_is_stopped(cc_host: Any, fake_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLAUDE_HUGE_MB", "3")
    async with cc_host(table={"max_output_bytes": 1024 * 1024}) as host:
        stream = host.stream({"model": MODEL, "prompt": "!huge"})
        with pytest.raises(BadRequest, match="more than 1048576 bytes on stdout"):
            [d async for d in stream]
