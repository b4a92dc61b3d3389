"""Streaming through the installed plugins (entry points: the real queue, retry and tokens plugins) for
each of the three provider plugins: pieces before the upstream finishes, usage in the ledger from the
last chunk, failover before the first piece, a cut, the consumer leaving; and the offline tools batch."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ksi_it import ROOT, cli, results

from ksi_host import Host, ProviderUnavailable

FAKE = ROOT / "plugins" / "provider-claude-cli" / "tests" / "fake_claude.py"
TOOLS = ROOT / "examples" / "tools.jsonl"


def fake_claude() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_claude", FAKE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def claude_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``claude`` first on PATH (its state folder), the litellm deployment's key set."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    fake_claude().install(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_CLAUDE_DIR", str(state))
    monkeypatch.delenv("FAKE_CLAUDE_NO_PARTIAL", raising=False)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("KSI_IT_STREAM_KEY", "sk-it-stream")  # the litellm deployment's key
    return state


def config(server: Any) -> dict[str, Any]:
    return {
        "openai": {"deployments": [{"name": "oa-first", "model": "gpt-oa", "api_base": server.url, "timeout_s": 5},
                                   {"name": "oa-second", "model": "gpt-oa", "api_base": server.url, "timeout_s": 5}]},
        "litellm": {"deployments": [{"name": "lit-main", "model": "gpt-lit", "litellm_model": "openai/gpt-lit",
                                     "api_base": server.url, "api_key_env": "KSI_IT_STREAM_KEY", "timeout_s": 5}]},
    }


def ledger(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT request_id, provider, outcome, prompt_tokens, completion_tokens, total_tokens "
                         "FROM token_usage ORDER BY id").fetchall()


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("model", ["gpt-oa", "gpt-lit", "claude-cli/sonnet"])
async def test_each_provider_streams_through_the_real_queue_with_usage_in_the_ledger(
        openai_server: Any, claude_state: Path, tmp_path: Path, model: str) -> None:
    db = tmp_path / "ksi.db"
    claude = model.startswith("claude-cli/")
    prompt = "!streamhold" if claude else "one two three"
    openai_server.script("hold")
    async with Host(config(openai_server), db) as host:
        assert {"queue", "retry", "tokens"} <= {p.name for p in host.plugins}
        stream = host.stream({"model": model, "prompt": prompt, "session_id": "s1", "agent_id": "a1"})
        got = []
        async for delta in stream:
            if not got:  # the upstream has not finished yet: it waits for the test
                if claude:
                    assert not (claude_state / "release").exists()
                    (claude_state / "release").write_text("go")
                else:
                    assert openai_server.holding == 1
                    openai_server.release()
            got.append(delta)
    r = stream.result
    assert r is not None and r.ok, r
    assert r.text == ("turn 1: echo: !streamhold" if claude else "echo: one two three")
    assert got[-1].usage is not None and r.usage.total_tokens == got[-1].usage.total_tokens > 0
    [row] = ledger(db)
    assert row[0] == stream.request_id and row[2] == "ok"
    assert row[3:] == (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)
    if not claude:
        sent = openai_server.arrivals[0].usage
        assert row[3:] == (sent["prompt_tokens"], sent["completion_tokens"], sent["total_tokens"])


async def test_failover_before_the_first_piece_with_the_retry_plugin(openai_server: Any, claude_state: Path,
                                                                    tmp_path: Path) -> None:
    openai_server.script("503")
    async with Host(config(openai_server), tmp_path / "ksi.db") as host:
        stream = host.stream({"model": "gpt-oa", "prompt": "hi"})
        text = "".join([d.content or "" async for d in stream])
    assert text == "echo: hi" and stream.result is not None
    assert [(a.provider, a.error_type) for a in stream.result.attempts] == [("oa-first", "ProviderUnavailable"),
                                                                           ("oa-second", None)]
    assert [(row[1], row[2]) for row in ledger(tmp_path / "ksi.db")] == [("oa-first", "ProviderUnavailable"),
                                                                          ("oa-second", "ok")]


async def test_a_cut_after_the_first_piece_ends_in_an_error_with_no_retry(openai_server: Any, claude_state: Path,
                                                                          tmp_path: Path) -> None:
    openai_server.cut_after = 3
    openai_server.script("cut")
    async with Host(config(openai_server), tmp_path / "ksi.db") as host:
        stream = host.stream({"model": "gpt-oa", "prompt": "one two three"})
        with pytest.raises(ProviderUnavailable, match="oa-first"):
            [d async for d in stream]
    assert stream.result is not None and stream.result.status == "error" and stream.result.text == "echo: one "
    assert openai_server.hits == 1 and [row[2] for row in ledger(tmp_path / "ksi.db")] == ["ProviderUnavailable"]


async def test_the_consumer_leaving_closes_the_upstream_and_the_session_goes_on(openai_server: Any, claude_state: Path,
                                                                                tmp_path: Path) -> None:
    openai_server.script("hold")
    async with Host(config(openai_server), tmp_path / "ksi.db") as host:
        stream = host.stream({"model": "gpt-oa", "prompt": "one two", "session_id": "s1"})
        async for _ in stream:
            break
        await until(lambda: openai_server.closed_early == 1)
        after = await host.complete({"model": "gpt-oa", "prompt": "next", "session_id": "s1"})
    assert after.ok and after.text == "echo: next"


async def test_the_mock_streams_through_the_real_queue(claude_state: Path, tmp_path: Path) -> None:
    async with Host({}, tmp_path / "ksi.db") as host:
        stream = host.stream({"model": "mock/gpt-4o-mini", "prompt": "stream this"})
        pieces = [d async for d in stream]
    assert len(pieces) > 2 and stream.result is not None and stream.result.text == "mock response to: stream this"
    [row] = ledger(tmp_path / "ksi.db")
    assert row[1:3] == ("mock", "ok") and row[5] == stream.result.usage.total_tokens > 0


def test_the_tools_batch_runs_offline(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    p = cli("run", str(TOOLS), "--out", str(out), "--db", str(tmp_path / "ksi.db"))
    assert p.returncode == 0, p.stderr
    by_id = {r["request_id"]: r for r in results(out)}
    lines = {json.loads(line)["request_id"]: json.loads(line) for line in TOOLS.read_text().splitlines()}
    assert set(by_id) == set(lines) and all(r["status"] == "ok" for r in by_id.values())
    ask = by_id["tools-1-ask"]
    assert ask["finish_reason"] == "tool_calls" and ask["text"] is None
    [call] = ask["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])["unit"] == "celsius"
    answer = by_id["tools-1-answer"]
    sent_back = lines["tools-1-answer"]["messages"]
    assert [m["role"] for m in sent_back] == ["user", "assistant", "tool"]  # the second turn is another line
    assert answer["finish_reason"] == "stop" and answer["text"] == f"mock response to the tool result: {sent_back[2]['content']}"
    assert by_id["tools-2-named"]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    forecast = json.loads(by_id["tools-3-json"]["text"])
    assert set(forecast) == {"city", "high_c"} and isinstance(forecast["high_c"], float)
