"""The claude_cli plugin: config, circuits, status, order between provider plugins; the output mapping as pure functions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ksi_provider_claude_cli import cli
from ksi_provider_claude_cli.plugin import Plugin

from ksi_host import (
    AuthFailed,
    BadRequest,
    ConfigError,
    ContextWindowExceeded,
    FailureDecision,
    OperationalError,
    ProviderUnavailable,
    RateLimited,
    hookimpl,
)
from ksi_host.models import AttemptContext, CompletionRequest, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders
from ksi_host.testing.fakes import FakeClock

MODEL = "claude-cli/sonnet"
REQ = {"model": MODEL, "prompt": "hi"}


class FailOver:
    """Retryable errors move to another provider at once; the rest give up."""

    @hookimpl
    def ksi_handle_failure(self, error: OperationalError, attempt: AttemptContext) -> FailureDecision:
        if attempt.number < 4 and error.retryable:
            return FailureDecision.retry(0.0, switch_provider=attempt.provider is not None)
        return FailureDecision.give_up(error)


async def test_circuit_opens_after_failures_and_bad_requests_do_not_count(cc_host: Any, fake_cli: Any) -> None:
    clock = FakeClock()
    async with cc_host(table={"circuit": {"failures_to_open": 2, "cooldown_s": 30}}, clock=clock) as host:
        assert (await host.complete({**REQ, "prompt": "!maxturns"})).error["type"] == "BadRequest"
        assert (await host.complete({**REQ, "prompt": "!maxturns"})).error["type"] == "BadRequest"
        assert [p.state for p in await host.providers(MODEL)] == ["closed"]
        for _ in range(2):
            assert (await host.complete({**REQ, "prompt": "!crash"})).error["type"] == "ProviderUnavailable"
        (info,) = await host.providers(MODEL)
        assert info.state == "open" and "something broke" in info.detail["last_error"]
        n = len(fake_cli.calls())
        r = await host.complete(REQ)
        assert r.error["type"] == "ProviderUnavailable" and "open circuit" in r.error["message"]
        assert len(fake_cli.calls()) == n  # no process started while open
        clock.t += 30
        assert (await host.complete(REQ)).ok  # the half-open trial closes it
        assert [p.state for p in await host.providers(MODEL)] == ["closed"]


async def test_list_providers_and_status(cc_host: Any, fake_cli: Any) -> None:
    table = {"priority": 3, "deployments": [{"name": "haiku", "model": "haiku-*", "cli_model": "haiku", "timeout_s": 90}]}
    async with cc_host(table=table) as host:
        infos = await host.providers(None)
        assert [(i.name, i.model, i.plugin) for i in infos] == [("haiku", "haiku-*", "claude_cli"),
                                                               ("claude-cli", "claude-cli/*", "claude_cli")]
        assert infos[0].priority == 3 and infos[0].detail["executable"] == "claude"
        assert "priority" not in infos[0].detail  # a fact of the plugin, on ProviderInfo only
        assert infos[0].detail["timeout_s"] == 90 and infos[1].detail["timeout_s"] == 600
        await host.complete({**REQ, "session_id": "a"})
        status = (await host.status())["claude_cli"]
    assert status["found"] == str(fake_cli.path) and status["sessions"] == 1 and status["priority"] == 3
    assert [c["name"] for c in status["circuits"]] == ["haiku", "claude-cli"]


async def test_builtin_off_serves_only_configured_models(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host(table={"builtin": False}) as host:
        r = await host.complete(REQ)
    assert r.error["type"] == "NoProviderError"


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"deployments": [{"name": "x", "model": "m", "extra_args": ["--resume", "abc"]}]}, "--resume is set by the plugin"),
        ({"deployments": [{"name": "x", "model": "m", "extra_args": ["--model=opus"]}]}, "--model is set by the plugin"),
        ({"deployments": [{"name": "x", "model": "m", "extra_args": ["--api-key", "sk-ant-abcdef123456"]}]},
         "looks like it holds a secret"),
        ({"deployments": [{"name": "claude-cli", "model": "m"}]}, "reserved for the built-in deployment"),
        ({"deployments": [{"name": "x", "model": "m", "api_key_env": "sk-ant-abcdef123456"}]}, "name of the environment variable"),
        ({"priority": "high"}, "claude_cli.priority"),
        ({"executable": ""}, "executable"),
    ],
)
async def test_bad_config_stops_start_up_naming_the_key(make_host: Any, table: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        async with make_host(Plugin(), config={"claude_cli": table}):
            pass
    assert words in str(info.value)
    assert "abcdef123456" not in str(info.value)


@pytest.mark.parametrize("registered_first", ["claude_cli", "other"])
async def test_config_priority_decides_which_plugin_answers(make_host: Any, fake_cli: Any, registered_first: str) -> None:
    # "fake" states no priority (ranks at 100); ties rank by name ("claude_cli" < "fake")
    for priority, want in ((1, "claude-cli"), (100, "claude-cli"), (101, "fake-1")):
        other = ScriptedProviders(FakeProvider("fake-1", "claude-cli/*", script=("from fake",)))
        plugins = [Plugin(), other] if registered_first == "claude_cli" else [other, Plugin()]
        async with make_host(*plugins, DirectQueue(), config={"claude_cli": {"priority": priority}}) as host:
            r = await host.complete(REQ)
            assert r.ok and r.provider == want, (priority, r)


async def test_preferred_cli_failing_over_to_the_other_plugin(make_host: Any, fake_cli: Any) -> None:
    other = ScriptedProviders(FakeProvider("fake-1", "claude-cli/*", script=("from fake",)))
    async with make_host(Plugin(), other, DirectQueue(), FailOver(), config={"claude_cli": {"priority": 1}}) as host:
        r = await host.complete({**REQ, "prompt": "!overloaded"})
    assert [(a.provider, a.error_type) for a in r.attempts] == [("claude-cli", "ProviderUnavailable"), ("fake-1", None)]


# -- the output mapping, as pure functions ---------------------------------------------------------


def test_parse_output_shapes() -> None:
    one = {"type": "result", "subtype": "success", "is_error": False, "result": "x", "session_id": "u"}
    assert cli.parse_output(json.dumps(one).encode()) == one
    assert cli.parse_output(json.dumps([{"type": "system"}, one]).encode()) == one
    assert cli.parse_output(b'{"type": "system"}\nnoise\n' + json.dumps(one).encode() + b"\n") == one
    for garbage in (b"", b"   ", b"hello", b"[1, 2]", b'{"type": "assistant"}', b"\xff\xfe{"):
        assert cli.parse_output(garbage) is None


def test_usage_counts_cache_tokens_as_prompt() -> None:
    u = cli.usage_of({"usage": {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300,
                                "output_tokens": 25}, "total_cost_usd": 0.5})
    assert u == Usage(330, 25, 355, 0.5)
    assert cli.usage_of({"cost_usd": 0.25}) == Usage(0, 0, 0, 0.25)  # older CLIs
    assert cli.usage_of({}) is None
    assert cli.usage_of({"usage": {"input_tokens": -1, "output_tokens": "x"}, "total_cost_usd": True}) == Usage(0, 0, 0, None)


def test_prompt_and_system_prompt() -> None:
    r = CompletionRequest(model="m", messages=[
        {"role": "system", "content": "A"}, {"role": "developer", "content": [{"type": "text", "text": "B"}]},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}])
    assert cli.system_prompt(r) == "A\n\nB"
    assert cli.prompt_of(r, resuming=True) == "q2"
    assert cli.prompt_of(r, resuming=False) == "\n".join(
        ["The conversation so far:", "", "User: q1", "Assistant: a1", "", "Answer the next user message.", "", "q2"])
    with pytest.raises(BadRequest):
        cli.prompt_of(CompletionRequest(model="m", messages=[{"role": "assistant", "content": "x"}]), resuming=False)
    argv = cli.command("claude", model="opus", resume="u-1", system="S", extra_args=["--max-turns", "1"])
    assert argv == ["claude", "-p", "--output-format", "json", "--model", "opus", "--resume", "u-1",
                    "--append-system-prompt", "S", "--max-turns", "1"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('API Error: 429 {"type":"error","error":{"type":"rate_limit_error","message":"slow"}}', RateLimited),
        ('API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', ProviderUnavailable),
        ("API Error: 500 Internal server error", ProviderUnavailable),
        ("API Error: 401 invalid x-api-key", AuthFailed),
        ("API Error: 400 prompt is too long: 210000 tokens > 200000 maximum", ContextWindowExceeded),
        ("Claude AI usage limit reached|1700000000", RateLimited),
        ("Too many requests", RateLimited),
        ("The API is overloaded right now", ProviderUnavailable),
        ("Invalid API key · Please run /login", AuthFailed),
        ("Not logged in", AuthFailed),
        ("Prompt is too long", ContextWindowExceeded),
        ("No conversation found with session ID: 123", BadRequest),
        ("segmentation fault", ProviderUnavailable),
    ],
)
def test_classify_text(text: str, error: type) -> None:
    e = cli.classify_text("dep", "what", text, now=1_699_999_900.0)
    assert type(e) is error and e.provider == "dep"
    if "usage limit" in text:
        assert e.retry_after == pytest.approx(100)


def test_secrets_never_reach_messages() -> None:
    e = cli.exit_error("dep", 1, "failed with key sk-ant-api03-SECRETSECRET and Bearer abcdefghijkl", "", secrets=("TOPSECRETVALUE",))
    assert "SECRETSECRET" not in e.message and "abcdefghijkl" not in e.message
    e = cli.exit_error("dep", 1, "echo TOPSECRETVALUE", "", secrets=("TOPSECRETVALUE",))
    assert "TOPSECRETVALUE" not in e.message
    assert "signal 9" in cli.exit_error("dep", -9, "", "").message


async def test_circuits_are_kept_in_the_database(cc_host: Any, fake_cli: Any, ksi_db_path: Any) -> None:
    import sqlite3

    async with cc_host(table={"circuit": {"failures_to_open": 1, "cooldown_s": 600}}) as host:
        assert (await host.complete({**REQ, "prompt": "!crash"})).error["type"] == "ProviderUnavailable"
    rows = sqlite3.connect(ksi_db_path).execute("SELECT name, state FROM claude_cli_circuits").fetchall()
    assert rows == [("claude-cli", "open")]
    async with cc_host(table={"circuit": {"failures_to_open": 1, "cooldown_s": 600}}) as host:
        assert [p.state for p in await host.providers(MODEL)] == ["open"]
