"""The host's side of conversations: ``CompletionRequest.history`` and a continuing request without a session plugin."""

from __future__ import annotations

import json

import attrs
import pytest
from ksi_it import cli, results

from ksi_host import CompletionRequest, ValidationError
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"}]


def test_history_counts_earlier_messages_and_is_checked() -> None:
    r = CompletionRequest("m", MESSAGES, session_id="s", continue_session=True)
    assert r.history == 0
    assert attrs.evolve(r, history=2).history == 2
    for bad in (3, -1, True, 1.0, "1"):
        with pytest.raises(ValidationError, match=r"^history: must be a count of earlier messages, 0 to 2"):
            attrs.evolve(r, history=bad)


def test_history_is_not_a_field_users_give_and_is_left_out_when_zero() -> None:
    with pytest.raises(ValidationError, match=r"^history: unknown field"):
        CompletionRequest.from_dict({"model": "m", "messages": MESSAGES, "history": 2})
    r = CompletionRequest("m", MESSAGES)
    assert "history" not in r.to_dict()
    assert attrs.evolve(r, history=2).to_dict()["history"] == 2


async def test_a_continuing_request_without_a_session_plugin_ends_naming_what_to_install(make_host) -> None:
    p = FakeProvider("fake")
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        r = await host.complete({"model": "m", "prompt": "Name?", "session_id": "s1", "continue_session": True})
        plain = await host.complete({"model": "m", "prompt": "Name?", "session_id": "s1"})
    assert r.status == "error" and r.attempts == () and len(p.calls) == 1  # only the plain request was sent
    assert r.error == {"type": "MissingPluginError",
                       "message": "no plugin implements ksi_prepare_request: install ksi-sessions: pip install -e plugins/sessions"}
    assert plain.ok


def test_ksi_host_run_without_ksi_sessions_fails_the_continuing_line_only(tmp_path, db) -> None:
    lines = [{"model": "mock/gpt-4o-mini", "prompt": "My name is Ada.", "session_id": "s1", "request_id": "a"},
             {"model": "mock/gpt-4o-mini", "prompt": "Name?", "session_id": "s1", "continue_session": True,
              "request_id": "b"}]
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "r.jsonl"
    p = cli("run", str(batch), "--out", str(out), "--db", str(db), env={"KSI_HOST_DISABLE": "sessions"})
    assert p.returncode == 1, p.stderr
    by_id = {r["request_id"]: r for r in results(out)}
    assert by_id["a"]["status"] == "ok"
    assert by_id["b"]["status"] == "error" and "ksi_prepare_request" in by_id["b"]["error"]["message"]
    assert "ksi-sessions" in by_id["b"]["error"]["message"]
