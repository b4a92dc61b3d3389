"""Calls through the claude_cli plugin with a fake ``claude`` on PATH: answers, sessions, failures, the hang."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from fake_claude import install, pid_alive

from ksi_host import (
    AuthFailed,
    BadRequest,
    ContextWindowExceeded,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    hookimpl,
)
from ksi_host.models import CompletionRequest
from ksi_host.testing import UsageCalls

MODEL = "claude-cli/sonnet"


def req(text: str = "hello there", model: str = MODEL, **kw: Any) -> dict[str, Any]:
    return {"model": model, "prompt": text, **kw}


class Conversation:
    """A stand-in for a session plugin (ksi-sessions): a session's ok turns, put before a request that continues it;
    a request that does not continue its session begins a new conversation."""

    def __init__(self) -> None:
        self.turns: dict[str, list[list[dict[str, Any]]]] = {}

    @hookimpl
    def ksi_prepare_request(self, request: CompletionRequest) -> CompletionRequest | None:
        earlier = [m for turn in self.turns.get(request.session_id or "", []) for m in turn]
        if not (request.continue_session and earlier):
            return None
        return attrs.evolve(request, messages=[*earlier, *request.messages], history=len(earlier))

    @hookimpl
    def ksi_request_finished(self, request: CompletionRequest, result: Any) -> None:
        if result.ok and (request.session_id or result.session_id):
            turn = [*request.messages[request.history:], result.message]
            turns = self.turns.setdefault(request.session_id or result.session_id, [])
            if not request.continue_session:
                turns.clear()
            turns.append(turn)


def provider(host: Any, name: str = "claude-cli") -> Any:
    p = host.pm.get_plugin("Plugin").pool.get(name)
    assert p is not None
    return p


async def test_answer_usage_cost_and_command_line(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        r = await host.complete(req("hello there"))
    assert r.ok, r.error
    assert (r.text, r.provider) == ("turn 1: echo: hello there", "claude-cli")
    # prompt tokens: input (2) + cache creation (7) + cache read (0); completion: output_tokens
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 5, 14)
    assert r.usage.cost_usd == pytest.approx(0.0123)
    (call,) = fake_cli.calls()
    assert call["argv"] == ["-p", "--output-format", "json", "--model", "sonnet"]
    assert call["prompt"] == "hello there"  # on stdin, never on the command line


async def test_default_model_passes_no_model_flag_and_configured_deployments_come_first(cc_host: Any, fake_cli: Any) -> None:
    table = {"deployments": [{"name": "opus", "model": "claude-cli/opus", "cli_model": "claude-opus-4-1",
                              "extra_args": ["--max-turns", "2"]}]}
    async with cc_host(table=table) as host:
        assert (await host.complete(req(model="claude-cli/default"))).provider == "claude-cli"
        assert (await host.complete(req(model="claude-cli/opus"))).provider == "opus"
    first, second = fake_cli.calls()
    assert "--model" not in first["argv"]
    assert second["argv"] == ["-p", "--output-format", "json", "--model", "claude-opus-4-1", "--max-turns", "2"]


async def test_session_continuity_through_resume(cc_host: Any, fake_cli: Any, ksi_db_path: Path) -> None:
    async with cc_host(Conversation()) as host:
        r1 = await host.complete(req("first", session_id="s1"))
        r2 = await host.complete(req("second", session_id="s1", continue_session=True))
        r3 = await host.complete(req("other", session_id="s2"))
    assert (r1.text, r1.session_id) == ("turn 1: echo: first", "s1")
    assert (r2.text, r2.session_id) == ("turn 2: echo: second", "s1")  # the CLI had the conversation
    assert r3.text == "turn 1: echo: other"
    c1, c2, c3 = fake_cli.calls()
    assert c1["resume"] is None and c3["resume"] is None
    uuid1 = sqlite3.connect(ksi_db_path).execute(
        "SELECT claude_session_id FROM claude_cli_sessions WHERE session_id = 's1'").fetchone()[0]
    assert c2["resume"] == uuid1 and c2["prompt"] == "second"  # the earlier turns the request carried: not sent again
    rows = sqlite3.connect(ksi_db_path).execute(
        "SELECT session_id, deployment, calls FROM claude_cli_sessions ORDER BY session_id").fetchall()
    assert rows == [("s1", "claude-cli", 2), ("s2", "claude-cli", 1)]


async def test_a_turn_answered_elsewhere_is_not_missed_by_resuming(cc_host: Any, fake_cli: Any) -> None:
    """A turn of the conversation answered by another provider (failover; another host): the CLI session lacks it,
    so the next call sends the whole conversation in a new CLI session, which the call after it resumes."""
    from ksi_host.testing import FakeProvider, ScriptedProviders

    async with cc_host(Conversation(), ScriptedProviders(FakeProvider("other", "other/*", script=["from elsewhere"]))) as host:
        assert (await host.complete(req("first", session_id="s1"))).ok
        assert (await host.complete(req("second", model="other/x", session_id="s1", continue_session=True))).ok
        r3 = await host.complete(req("third", session_id="s1", continue_session=True))
        r4 = await host.complete(req("fourth", session_id="s1", continue_session=True))
    c1, c3, c4 = fake_cli.calls()
    assert c3["resume"] is None and r3.text == "turn 1: echo: third"  # a new CLI session, sent the whole conversation
    assert c3["prompt"].splitlines()[2:6] == ["User: first", "Assistant: turn 1: echo: first", "User: second",
                                              "Assistant: from elsewhere"]
    assert c4["resume"] is not None and c4["resume"] != c1["resume"] and c4["prompt"] == "fourth"
    assert r4.text == "turn 2: echo: fourth"  # the CLI session of the third call, which has seen everything


async def test_a_request_that_does_not_continue_its_session_starts_a_new_cli_conversation(
    cc_host: Any, fake_cli: Any
) -> None:
    async with cc_host(Conversation()) as host:
        assert (await host.complete(req("first", session_id="s1"))).ok
        r2 = await host.complete(req("second", session_id="s1"))
        r3 = await host.complete(req("third", session_id="s1", continue_session=True))
    assert r2.text == "turn 1: echo: second" and r3.text == "turn 2: echo: third"
    c1, c2, c3 = fake_cli.calls()
    assert c2["resume"] is None and c3["resume"] is not None and c3["resume"] != c1["resume"]


async def test_a_resumed_call_answering_under_a_new_cli_id_moves_the_mapping(
    cc_host: Any, fake_cli: Any, monkeypatch: pytest.MonkeyPatch, ksi_db_path: Path
) -> None:
    monkeypatch.setenv("FAKE_CLAUDE_FORK", "1")
    async with cc_host(Conversation()) as host:
        for i in range(3):
            r = await host.complete(req(f"m{i}", session_id="s1", continue_session=i > 0))
            assert r.text == f"turn {i + 1}: echo: m{i}"
    calls = fake_cli.calls()
    (latest,) = sqlite3.connect(ksi_db_path).execute("SELECT claude_session_id FROM claude_cli_sessions").fetchone()
    assert calls[2]["resume"] != calls[1]["resume"]  # each call resumed the id the previous one answered under
    assert latest not in (calls[1]["resume"], calls[2]["resume"])


async def test_without_a_session_the_conversation_continues_under_the_cli_id(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host(Conversation()) as host:
        r1 = await host.complete(req("first"))
        assert r1.session_id is not None
        r2 = await host.complete(req("second", session_id=r1.session_id, continue_session=True))
    assert r2.text == "turn 2: echo: second"
    assert fake_cli.calls()[1]["resume"] == r1.session_id


async def test_system_prompt_and_transcript_of_earlier_turns(cc_host: Any, fake_cli: Any) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    async with cc_host(Conversation()) as host:
        r = await host.complete({"model": MODEL, "messages": msgs, "session_id": "t"})
        assert r.ok
        await host.complete({"model": MODEL, "prompt": "thanks", "session_id": "t", "continue_session": True})
    first, second = fake_cli.calls()
    assert first["system"] == "Be brief."
    assert first["prompt"].splitlines()[:4] == ["The conversation so far:", "", "User: What is 2+2?", "Assistant: 4"]
    assert first["prompt"].endswith("\nAnd 3+3?")
    assert second["prompt"] == "thanks" and second["resume"] is not None  # resuming: the CLI has the history


async def test_key_and_base_url_reach_the_process_environment_only(
    cc_host: Any, fake_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KSI_TEST_CLAUDE_KEY", "sk-ant-test-SECRET-123456")
    table = {"builtin": False, "deployments": [{"name": "keyed", "model": "claude-*", "api_key_env": "KSI_TEST_CLAUDE_KEY",
                                                "api_base": "https://gateway.example/anthropic"}]}
    async with cc_host(table=table) as host:
        assert (await host.complete(req(model="claude-x"))).ok
    (call,) = fake_cli.calls()
    assert call["key_set"] and call["key_sha256"] == hashlib.sha256(b"sk-ant-test-SECRET-123456").hexdigest()
    assert call["base_url"] == "https://gateway.example/anthropic"
    assert not any("SECRET" in a for a in call["argv"])


async def test_key_variable_unset_after_start_up_is_auth_failed_and_nothing_runs(
    cc_host: Any, fake_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KSI_TEST_LATER_UNSET_KEY", "sk-ant-test-0000000000")
    table = {"deployments": [{"name": "keyed", "model": "claude-x", "api_key_env": "KSI_TEST_LATER_UNSET_KEY"}]}
    async with cc_host(table=table) as host:
        monkeypatch.delenv("KSI_TEST_LATER_UNSET_KEY")  # the key is read at call time
        r = await host.complete(req(model="claude-x"))
    assert r.error["type"] == "AuthFailed" and "KSI_TEST_LATER_UNSET_KEY" in r.error["message"]
    assert fake_cli.calls() == []


async def test_hang_kills_the_process_group_at_the_deadline(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        p = provider(host)
        t0 = time.monotonic()
        with pytest.raises(ProviderTimeout) as info:
            await p.complete(CompletionRequest.from_dict(req("!hang")), timeout_s=1.0)
        elapsed = time.monotonic() - t0
    assert 0.95 <= elapsed < 2.5, elapsed
    assert "no answer within 1s" in info.value.message and "killed" in info.value.message
    pids = [int(x) for x in (fake_cli.state / "hang.pids").read_text().split()]
    deadline = time.monotonic() + 2
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not any(pid_alive(pid) for pid in pids), "the CLI or its child outlived the deadline"


async def test_a_cancelled_call_kills_the_process(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        task = asyncio.ensure_future(provider(host).complete(CompletionRequest.from_dict(req("!hang")), timeout_s=30))
        pids_file = fake_cli.state / "hang.pids"
        deadline = time.monotonic() + 10
        while not pids_file.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    pids = [int(x) for x in pids_file.read_text().split()]
    deadline = time.monotonic() + 2
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not any(pid_alive(pid) for pid in pids)


async def test_missing_executable_is_provider_unavailable_naming_it(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host(table={"executable": "claude-not-installed-here"}) as host:
        r = await host.complete(req())
        status = await host.status()
    assert r.error["type"] == "ProviderUnavailable"
    assert "'claude-not-installed-here' was not found" in r.error["message"]
    assert status["claude_cli"]["found"] is None


async def test_executable_that_is_not_executable(cc_host: Any, fake_cli: Any, tmp_path: Path) -> None:
    plain = tmp_path / "plain" / "claude"
    plain.parent.mkdir()
    plain.write_text("not a program")
    async with cc_host(table={"executable": str(plain)}) as host:
        r = await host.complete(req())
    assert r.error["type"] == "ProviderUnavailable" and "is not executable" in r.error["message"]


async def test_configured_executable_path_is_used(cc_host: Any, fake_cli: Any, tmp_path: Path) -> None:
    other = install(tmp_path / "elsewhere", name="my-claude")
    async with cc_host(table={"executable": str(other)}) as host:
        r = await host.complete(req())
        status = await host.status()
    assert r.ok and status["claude_cli"]["found"] == str(other)


@pytest.mark.parametrize(
    ("prompt", "error", "words"),
    [
        ("!garbage", ProviderUnavailable, "malformed response: stdout is not the CLI's JSON result"),
        ("!noresult", ProviderUnavailable, "malformed response"),
        ("!ratelimit", RateLimited, "rate limited (HTTP 429"),
        ("!ratetext", RateLimited, "rate limited"),
        ("!overloaded", ProviderUnavailable, "unavailable (HTTP 529): Overloaded"),
        ("!crash", ProviderUnavailable, "exited with code 2: Error: something broke"),
        ("!maxturns", BadRequest, "maximum number of turns (3; error_max_turns)"),
        ("!execerror", ProviderUnavailable, "error_during_execution, exit code 1"),
        ("!usagelimit", RateLimited, "usage limit reached"),
        ("!authfail", AuthFailed, "Invalid API key"),
        ("!toolong", ContextWindowExceeded, "Prompt is too long"),
    ],
)
async def test_each_failure_maps(cc_host: Any, fake_cli: Any, prompt: str, error: type, words: str) -> None:
    async with cc_host() as host:
        with pytest.raises(error) as info:
            await provider(host).complete(CompletionRequest.from_dict(req(prompt)), timeout_s=10)
    e = info.value
    assert type(e) is error
    assert e.provider == "claude-cli" and e.message.startswith("claude-cli: ")
    assert words in e.message, e.message
    assert len(fake_cli.calls()) == 1  # one process per attempt
    if prompt == "!usagelimit":
        assert e.retry_after == pytest.approx(120, abs=3)
    if prompt == "!ratelimit":
        assert e.status_code == 429


async def test_usage_of_a_failed_call_is_recorded(cc_host: Any, fake_cli: Any) -> None:
    recorder = UsageCalls()
    async with cc_host(recorder) as host:
        r = await host.complete(req("!execerror"))
    assert r.error["type"] == "ProviderUnavailable"
    (call,) = recorder.calls
    assert call.outcome == "ProviderUnavailable" and call.usage.completion_tokens == 4
    assert call.usage.cost_usd == pytest.approx(0.0123)


async def test_resuming_a_session_the_cli_lost_is_a_bad_request(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host(Conversation()) as host:
        assert (await host.complete(req("first", session_id="s1"))).ok
        for f in (fake_cli.state / "sessions").iterdir():
            f.unlink()
        r = await host.complete(req("second", session_id="s1", continue_session=True))
    assert r.error["type"] == "BadRequest" and "session to resume is gone" in r.error["message"]


async def test_older_array_output_is_understood(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        r = await host.complete(req("!array"))
    assert r.ok and r.text == "turn 1: echo: !array" and r.usage.cost_usd == pytest.approx(0.0123)


async def test_no_user_message_is_a_bad_request_without_a_process(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        r = await host.complete({"model": MODEL, "messages": [{"role": "system", "content": "x"}]})
    assert r.error["type"] == "BadRequest" and fake_cli.calls() == []


async def test_a_cli_session_whose_seen_conversation_is_unknown_is_not_resumed(
    cc_host: Any, fake_cli: Any, ksi_db_path: Path
) -> None:
    """A row without ``seen`` (written before it existed): the conversation is sent whole, never half."""
    async with cc_host(Conversation()) as host:
        assert (await host.complete(req("first", session_id="s1"))).ok
        with sqlite3.connect(ksi_db_path) as db:
            db.execute("UPDATE claude_cli_sessions SET seen = NULL")
        r2 = await host.complete(req("second", session_id="s1", continue_session=True))
    assert fake_cli.calls()[1]["resume"] is None and r2.text == "turn 1: echo: second"
