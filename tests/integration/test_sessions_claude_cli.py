"""One source of continuity: the claude CLI (its fake) resumes its own conversation and then gets only the new turn;
a session that moves to it from another provider is sent whole, once; ksi-sessions keeps every turn either way."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from ksi_it import ROOT

from ksi_host import Host

sys.path.insert(0, str(ROOT / "plugins" / "provider-claude-cli" / "tests"))
import fake_claude  # noqa: E402

SYSTEM = {"role": "system", "content": "Be brief."}
CLAUDE = "claude-cli/sonnet"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake ``claude``; its state folder is returned (``fake_claude.calls(state)``)."""
    state = tmp_path / "claude-state"
    monkeypatch.setenv("FAKE_CLAUDE_DIR", str(state))
    monkeypatch.delenv("FAKE_CLAUDE_FORK", raising=False)
    monkeypatch.setenv("KSI_HOST_PLUGINS", "queue,openai,claude_cli,retry,tokens,sessions")
    fake_claude.install(tmp_path / "bin")
    return state


def config(tmp_path: Path, url: str) -> dict[str, Any]:
    return {"claude_cli": {"executable": str(tmp_path / "bin" / "claude")},
            "openai": {"deployments": [{"name": "local", "model": "gpt-test", "api_base": url}]}}


def ask(text: str, model: str = CLAUDE, **kw: Any) -> dict[str, Any]:
    return {"model": model, "session_id": "s1", "prompt": text, "continue_session": True, **kw}


async def test_the_cli_resumes_its_conversation_and_gets_only_the_new_turn(
    fake: Path, tmp_path: Path, openai_server: Any
) -> None:
    async with Host(config(tmp_path, openai_server.url), tmp_path / "k.db") as host:
        r1 = await host.complete({"model": CLAUDE, "session_id": "s1", "messages": [SYSTEM, {"role": "user",
                                                                                             "content": "My name is Ada."}]})
        r2 = await host.complete(ask("Name?"))
        r3 = await host.complete(ask("Sure?"))
    assert [r.text for r in (r1, r2, r3)] == ["turn 1: echo: My name is Ada.", "turn 2: echo: Name?",
                                              "turn 3: echo: Sure?"]  # the CLI held the conversation
    c1, c2, c3 = fake_claude.calls(fake)
    assert c1["resume"] is None and c1["prompt"] == "My name is Ada."
    assert c2["resume"] is not None and c2["prompt"] == "Name?"  # only the new turn, not the transcript
    assert c3["resume"] == c2["resume"] and c3["prompt"] == "Sure?"
    assert c1["system"] == c2["system"] == c3["system"] == "Be brief."  # the first turn's system message, each call


async def test_a_session_that_moves_to_the_cli_is_sent_whole_once_then_resumed_and_moves_back_whole(
    fake: Path, tmp_path: Path, openai_server: Any
) -> None:
    async with Host(config(tmp_path, openai_server.url), tmp_path / "k.db") as host:
        await host.complete({"model": "gpt-test", "session_id": "s1", "prompt": "My name is Ada."})
        await host.complete(ask("I like tea.", model="gpt-test"))
        r3 = await host.complete(ask("Name?"))
        r4 = await host.complete(ask("Drink?"))
        r5 = await host.complete(ask("Bye.", model="gpt-test"))
    assert all(r.ok for r in (r3, r4, r5))
    c3, c4 = fake_claude.calls(fake)
    assert c3["resume"] is None  # the CLI has no conversation of this session yet: the transcript is the prompt
    assert c3["prompt"].splitlines() == ["The conversation so far:", "", "User: My name is Ada.",
                                         "Assistant: echo: My name is Ada.", "User: I like tea.",
                                         "Assistant: echo: I like tea.", "", "Answer the next user message.", "", "Name?"]
    assert c4["resume"] is not None and c4["prompt"] == "Drink?"
    back = openai_server.arrivals[-1].body["messages"]  # every turn, whoever answered it
    assert [m["content"] for m in back] == [
        "My name is Ada.", "echo: My name is Ada.", "I like tea.", "echo: I like tea.", "Name?", r3.text,
        "Drink?", r4.text, "Bye."]


async def test_a_forgotten_session_is_not_resumed(fake: Path, tmp_path: Path, openai_server: Any) -> None:
    async with Host(config(tmp_path, openai_server.url), tmp_path / "k.db") as host:
        await host.complete({"model": CLAUDE, "session_id": "s1", "prompt": "My name is Ada."})
        assert (await host.complete(ask("Name?"))).text == "turn 2: echo: Name?"
        sessions = host.pm.get_plugin("sessions")
        assert await sessions.store.forget("s1") == 2
        r = await host.complete(ask("Name?"))
    assert r.text == "turn 1: echo: Name?"
    assert fake_claude.calls(fake)[-1]["resume"] is None
