"""A request id submitted again with a different request (model, messages, max_tokens or temperature) is
refused with an error naming the id and what differs; the same request under the same id is answered as
before (idempotency), whatever its scheduling fields (session, agent, purpose, priority, timeout, metadata)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import calls, env, fake_site, ksi, run, write_requests
from ksi_queue import Plugin
from queue_helpers import GatedProvider, rows, settle, status_of, stored_only

from ksi_host.errors import ValidationError
from ksi_host.models import CompletionRequest
from ksi_host.testing import FakeProvider, ScriptedProviders


def message(text: str, *, keys_reversed: bool = False) -> list[dict[str, Any]]:
    return [{"content": text, "role": "user"}] if keys_reversed else [{"role": "user", "content": text}]


def request(rid: str = "r0", text: str = "hi", **kw: Any) -> CompletionRequest:
    kw.setdefault("model", "m")
    return CompletionRequest(messages=kw.pop("messages", message(text)), request_id=rid, **kw)


async def test_a_final_request_id_submitted_again_with_another_request_is_refused_naming_what_differs(
        make_host: Any) -> None:
    provider = FakeProvider("p1")
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        first = await host.complete(request(temperature=0.5, max_tokens=10))
        with pytest.raises(ValidationError, match=r"^request_id: 'r0' is already stored with a different request "
                                                  r"\(differs in messages\): a request id names one request"):
            await host.submit(request(text="something else", temperature=0.5, max_tokens=10))
        with pytest.raises(ValidationError, match=r"'r0' .*\(differs in model, max_tokens, temperature\)"):
            await host.submit(request(model="other", temperature=0.7))
        # the same question, asked by someone else, otherwise scheduled: the stored answer
        again = await host.complete(request(temperature=0.5, max_tokens=10, session_id="s", agent_id="a", purpose="p",
                                            priority="high", timeout_s=9.0, metadata={"k": "v"}))
        # the same by value: keys in another order, 0.5 as written another way
        same = await host.complete(request(messages=message("hi", keys_reversed=True), temperature=0.50, max_tokens=10))
    assert again == first and same == first
    assert len(provider.calls) == 1


async def test_a_queued_or_restored_request_id_submitted_again_with_another_request_is_refused(
        make_host: Any, ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:  # stored for the next serving host: restored there
        await host.submit(request("restored", "one"))
    gate = GatedProvider()
    async with make_host(Plugin(), ScriptedProviders(gate), config={"queue": {"concurrency": 1}}) as host:
        await gate.wait_calls(1)  # "restored" runs; "queued" will wait behind it
        queued = await host.submit(request("queued", "two"))
        with pytest.raises(ValidationError, match=r"'queued' is already stored with a different request \(differs in messages"):
            await host.submit(request("queued", "not two"))
        with pytest.raises(ValidationError, match=r"'restored' is already stored with a different request \(differs in model"):
            await host.submit(request("restored", "one", model="m2"))
        both = [await host.submit(request("restored", "one")), await host.submit(request("queued", "two"))]
        gate.release_all()
        results = [await t.result() for t in both] + [await queued.result()]
    assert [r.ok for r in results] == [True, True, True]
    assert gate.calls == ["restored", "queued"]  # each ran once


async def test_a_host_that_does_not_serve_refuses_another_request_under_a_stored_id(make_host: Any, ksi_db_path: Any) -> None:
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        await host.submit(request("r0", "one"))
        with pytest.raises(ValidationError, match=r"'r0' is already stored with a different request \(differs in messages"):
            await host.submit(request("r0", "two"))
        ticket = await host.submit(request("r0", "one"))  # the same: stored once, for the next serving host
        await settle()
        assert not ticket.is_done()
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM ksi_queue_requests") == [(1,)]
    assert status_of(ksi_db_path, "r0") == "queued"


async def test_rows_stored_without_a_hash_are_accepted(make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1")
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        first = await host.complete(request("old", "one"))
    con = sqlite3.connect(ksi_db_path)
    con.execute("UPDATE ksi_queue_requests SET request_hash = NULL")  # as stored before migration 3
    con.commit()
    con.close()
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        assert await host.complete(request("old", "not what was stored")) == first  # no hash: nothing to compare
    assert len(provider.calls) == 1


def test_ksi_host_run_answers_a_reused_request_id_with_an_error_naming_it(tmp_path: Path) -> None:
    db, log = tmp_path / "k.db", tmp_path / "calls.log"
    environ = env(fake_site(tmp_path / "site"), log)
    first = write_requests(tmp_path / "first.jsonl", 3, 1)
    assert run(ksi("run", first, "--db", db, "--out", tmp_path / "out1.jsonl"), environ).returncode == 0
    changed = tmp_path / "changed.jsonl"
    lines = first.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "prompt": "a different question"})
    changed.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out2.jsonl"
    p = run(ksi("run", changed, "--db", db, "--out", out), environ)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    results = {r["request_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [results[f"r{i:03d}"]["status"] for i in range(3)] == ["ok", "error", "ok"]
    assert results["r001"]["error"]["message"] == (
        "line 2: request_id: 'r001' is already stored with a different request (differs in messages): a request id names "
        "one request; give this one its own request_id")
    assert calls(log) == ["r000", "r001", "r002"]  # nothing sent again
