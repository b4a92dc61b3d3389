"""Conversations on the local OpenAI-compatible server, with the real queue, provider, retry, tokens and sessions
plugins: what reached the upstream is read from the server's arrival log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ksi_it import cli, results
from ksi_provider_openai.plugin import Plugin as OpenAI
from ksi_queue.plugin import Plugin as Queue
from ksi_retry.plugin import Plugin as Retry
from ksi_sessions.plugin import Plugin as Sessions
from ksi_tokens.plugin import Plugin as Tokens

from ksi_host import Host, ProviderResponse
from ksi_host.testing import FakeProvider, ScriptedProviders

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def sent(server: Any) -> list[list[dict[str, Any]]]:
    """The messages each completion request that reached the server carried, in arrival order."""
    return [a.body["messages"] for a in server.arrivals]


def provider_config(plugin: str, url: str, **sessions: Any) -> dict[str, Any]:
    if plugin == "openai":
        table = {"openai": {"deployments": [{"name": "local", "model": "gpt-test", "api_base": url}]}}
    else:
        table = {"litellm": {"deployments": [{"name": "local", "model": "gpt-test", "litellm_model": "openai/gpt-test",
                                              "api_base": url, "api_key_env": "KSI_TEST_SESSIONS_KEY"}]}}
    return {**table, "sessions": sessions}


@pytest.mark.parametrize("plugin", ["openai", "litellm"])
async def test_the_second_and_third_turns_reach_the_upstream_with_the_earlier_turns(
    openai_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugin: str
) -> None:
    monkeypatch.setenv("KSI_HOST_PLUGINS", f"queue,{plugin},retry,tokens,sessions")
    monkeypatch.setenv("KSI_TEST_SESSIONS_KEY", "sk-test-sessions-0123456789")
    async with Host(provider_config(plugin, openai_server.url), tmp_path / "k.db") as host:
        # submitted together: the queue runs a session's requests in order, each after the one before is stored
        tickets = [
            await host.submit({"model": "gpt-test", "session_id": "s1", "messages": [SYSTEM, user("My name is Ada.")]}),
            await host.submit({"model": "gpt-test", "session_id": "s1", "prompt": "Name?", "continue_session": True}),
            await host.submit({"model": "gpt-test", "session_id": "s1", "prompt": "Sure?", "continue_session": True}),
        ]
        r1, r2, r3 = [await t.result() for t in tickets]
        by_session = {r["key"]: r for r in await host.usage_report(by="session")}
    assert all(r.ok for r in (r1, r2, r3)), (r1.error, r2.error, r3.error)
    turn1 = [SYSTEM, user("My name is Ada."), answer("echo: My name is Ada.")]
    turn2 = [user("Name?"), answer("echo: Name?")]
    assert sent(openai_server) == [turn1[:2], [*turn1, user("Name?")], [*turn1, *turn2, user("Sure?")]]
    # "Name?" alone is 4 prompt tokens on this server; the second turn counted the first one too
    assert r2.usage.prompt_tokens == (2 + 3) + (4 + 3) + (5 + 3) + (1 + 3) == 24  # words + 3 a message
    assert by_session["s1"]["prompt_tokens"] == sum(a.usage["prompt_tokens"] for a in openai_server.arrivals)


async def test_a_tool_call_conversation_goes_on_at_the_upstream(openai_server: Any, tmp_path: Path) -> None:
    """The first turn's answer is a tool call (a fake planner answers it); the tool's result continues the
    conversation on the server, which receives the call and its result, ids and all."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    planner = FakeProvider("planner", model="planner",
                           script=[ProviderResponse("", tool_calls=[call], finish_reason="tool_calls")])
    config = {"openai": {"deployments": [{"name": "local", "model": "gpt-test", "api_base": openai_server.url}]}}
    plugins = [Queue, OpenAI, Retry, Tokens, Sessions, ScriptedProviders(planner)]
    async with Host(config, tmp_path / "k.db", plugins=plugins) as host:
        r1 = await host.complete({"model": "planner", "session_id": "t", "prompt": "Weather in Paris?", "tools": tools})
        assert r1.ok and r1.message["tool_calls"] == [call]
        result = {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
        r2 = await host.complete({"model": "gpt-test", "session_id": "t", "messages": [result], "tools": tools,
                                  "continue_session": True})
        r3 = await host.complete({"model": "gpt-test", "session_id": "t", "prompt": "Thanks!", "continue_session": True})
    assert r2.ok and r3.ok, (r2.error, r3.error)
    asked = [user("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [call]}, result]
    assert sent(openai_server) == [asked, [*asked, answer("the tool said: 18 C"), user("Thanks!")]]  # the server answers a tool result


async def test_old_turns_are_trimmed_and_the_system_message_stays(
    openai_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KSI_HOST_PLUGINS", "queue,openai,retry,tokens,sessions")
    async with Host(provider_config("openai", openai_server.url, max_turns=1), tmp_path / "k.db") as host:
        await host.complete({"model": "gpt-test", "session_id": "s", "messages": [SYSTEM, user("one")]})
        for text in ("two", "three"):
            assert (await host.complete({"model": "gpt-test", "session_id": "s", "prompt": text,
                                         "continue_session": True})).ok
    assert sent(openai_server)[2] == [SYSTEM, user("two"), answer("echo: two"), user("three")]


def test_a_batch_continues_its_sessions_and_forget_session_forgets(openai_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "ksi.toml"
    config.write_text(f'[[openai.deployments]]\nname = "local"\nmodel = "gpt-test"\napi_base = "{openai_server.url}"\n')
    lines = [
        {"request_id": "a1", "session_id": "a", "model": "gpt-test", "prompt": "My name is Ada."},
        {"request_id": "b1", "session_id": "b", "model": "gpt-test", "prompt": "My name is Bob."},
        {"request_id": "a2", "session_id": "a", "model": "gpt-test", "prompt": "Name?", "continue_session": True},
        {"request_id": "b2", "session_id": "b", "model": "gpt-test", "prompt": "Name?", "continue_session": True},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    env = {"KSI_HOST_PLUGINS": "queue,openai,retry,tokens,sessions"}
    db, out = tmp_path / "k.db", tmp_path / "out.jsonl"
    ran = cli("run", str(batch), "--out", str(out), "--db", str(db), "--config", str(config), "--concurrency", "4", env=env)
    assert ran.returncode == 0, ran.stderr
    assert {r["request_id"]: r["status"] for r in results(out)} == dict.fromkeys(["a1", "b1", "a2", "b2"], "ok")
    carried = {m[-1]["content"] + " " + m[0]["content"] for m in sent(openai_server)}
    assert carried == {"My name is Ada. My name is Ada.", "My name is Bob. My name is Bob.",
                       "Name? My name is Ada.", "Name? My name is Bob."}  # each session its own conversation

    shown = cli("show-session", "a", "--db", str(db), env=env)
    assert shown.returncode == 0, shown.stderr
    assert [line for line in shown.stdout.splitlines() if not line.startswith("turn")] == [
        "session a: 2 turn(s)", "  user: My name is Ada.", "  assistant: echo: My name is Ada.",
        "  user: Name?", "  assistant: echo: Name?"]
    forgot = cli("forget-session", "a", "--db", str(db), env=env)
    assert forgot.stdout.strip() == "forgot 2 turn(s) of session a"

    batch.write_text(json.dumps({"request_id": "a3", "session_id": "a", "model": "gpt-test", "prompt": "Name?",
                                 "continue_session": True}) + "\n")
    ran = cli("run", str(batch), "--out", str(out), "--db", str(db), "--config", str(config), env=env)
    assert ran.returncode == 0, ran.stderr
    assert sent(openai_server)[-1] == [user("Name?")]  # forgotten: nothing earlier is sent
