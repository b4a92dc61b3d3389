"""The transcript's rows: every message comes back as it was sent; show-session and forget-session."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ksi_sessions.plugin import Plugin
from ksi_sessions.transcript import COLUMNS, from_row, to_row

from ksi_host import ProviderResponse
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

CALL = {"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "ksi"}'}}
MESSAGES = [
    {"role": "system", "content": "Be brief.", "name": "policy"},
    {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
    {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}],
     "cache_control": {"type": "ephemeral"}},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_9", "content": "a framework"},
    {"role": "assistant", "content": None, "refusal": "I can't say more."},
    {"role": "assistant", "content": "", "audio": {"id": "audio_1"}},
    {"role": "user", "content": "Ünïcødé, \u2028 and \"quotes\""},
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m["role"])
def test_a_message_comes_back_as_it_was(message: dict[str, Any]) -> None:
    assert from_row(dict(zip(COLUMNS, to_row(message), strict=True))) == message


def test_text_tool_calls_and_ids_have_columns_and_other_keys_are_one_document() -> None:
    row = dict(zip(COLUMNS, to_row(MESSAGES[3]), strict=True))
    assert row["role"] == "assistant" and row["content"] is None and json.loads(row["tool_calls"]) == [CALL]
    row = dict(zip(COLUMNS, to_row(MESSAGES[2]), strict=True))
    assert json.loads(row["extra"]) == {"cache_control": {"type": "ephemeral"}} and row["content"] is None
    assert json.loads(row["content_parts"])[0] == {"type": "text", "text": "What is this?"}


async def test_every_kind_of_message_goes_through_the_database_and_back(make_host) -> None:
    p = FakeProvider("fake", script=[ProviderResponse("seen"), ProviderResponse("again")])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        assert (await host.complete({"model": "m", "session_id": "s", "messages": MESSAGES})).ok
        assert (await host.complete({"model": "m", "session_id": "s", "prompt": "more", "continue_session": True})).ok
    assert list(p.calls[1].messages) == [*MESSAGES, {"role": "assistant", "content": "seen"},
                                         {"role": "user", "content": "more"}]


def cli(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KSI_HOST_PLUGINS": "sessions"}
    env.pop("KSI_HOST_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "ksi_host.cli", *args, "--db", str(db)], capture_output=True,
                          text=True, env=env, timeout=60)


async def test_show_session_prints_the_transcript_and_forget_session_forgets_it(make_host, ksi_db_path) -> None:
    tool = {"role": "tool", "tool_call_id": "call_9", "content": "a framework"}
    p = FakeProvider("fake", script=[ProviderResponse("", tool_calls=[CALL], finish_reason="tool_calls"),
                                     ProviderResponse("It is a framework.")])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "messages": [MESSAGES[0], {"role": "user", "content": "KSI?"}]})
        await host.complete({"model": "m", "session_id": "s1", "messages": [tool], "continue_session": True})
        await host.complete({"model": "m", "session_id": "s2", "prompt": "other"})
    shown = cli("show-session", "s1", db=ksi_db_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "session s1: 2 turn(s)"
    assert lines[1].startswith("turn 1  new conversation  request ") and "provider fake" in lines[1]
    assert lines[2:5] == ["  system: Be brief.", "  user: KSI?", '  assistant: [tool call call_9] lookup({"q": "ksi"})']
    assert lines[5].startswith("turn 2  continued  request ")
    assert lines[6:] == ["  tool [call_9]: a framework", "  assistant: It is a framework."]
    as_json = json.loads(cli("show-session", "s1", "--json", db=ksi_db_path).stdout)
    assert [t["turn"] for t in as_json] == [1, 2] and as_json[1]["messages"] == [tool, {"role": "assistant",
                                                                                       "content": "It is a framework."}]

    forgot = cli("forget-session", "s1", db=ksi_db_path)
    assert (forgot.returncode, forgot.stdout.strip()) == (0, "forgot 2 turn(s) of session s1")
    gone = cli("show-session", "s1", db=ksi_db_path)
    assert gone.returncode == 1 and "session s1 has no transcript" in gone.stderr
    with sqlite3.connect(ksi_db_path) as conn:  # the other session is left alone; no message of s1 is left
        assert conn.execute("SELECT session_id, COUNT(*) FROM session_messages GROUP BY session_id").fetchall() == [("s2", 2)]


async def test_a_session_forgotten_is_continued_without_earlier_turns(make_host, ksi_db_path) -> None:
    p = FakeProvider("fake", script=["ok"])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "prompt": "one"})
        assert cli("forget-session", "s1", db=ksi_db_path).returncode == 0
        await host.complete({"model": "m", "session_id": "s1", "prompt": "two", "continue_session": True})
    assert [m["content"] for m in p.calls[1].messages] == ["two"]
