"""``ksi-host show`` and ``ksi-host logs`` over in-test plugins that keep requests and ledger rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_dist, run_cli

KEEPER = '''
import time
from ksi_host import hookimpl

NOW = time.time()
REQUESTS = [
    {"request_id": f"r{i}", "session_id": f"s{i % 2}", "agent_id": "planner" if i % 2 else "coder", "model": "m",
     "status": "error" if i == 3 else "ok", "attempts": 2 if i == 3 else 1, "total_tokens": 10 * i,
     "cost_usd": None if i == 3 else 0.001 * i, "latency_ms": 12.5, "submitted_at": NOW - 60 * (5 - i)}
    for i in range(5)
]


class Keeper:
    @hookimpl
    def ksi_list_requests(self, query):
        rows = [r for r in reversed(REQUESTS)
                if (query.session_id is None or r["session_id"] == query.session_id)
                and (query.status is None or r["status"] == query.status)
                and (query.since is None or r["submitted_at"] >= query.since)]
        return rows[: query.limit]

    @hookimpl
    def ksi_request_details(self, request_id):
        if request_id != "r3":
            return None
        return {"request": {"request_id": "r3", "model": "m", "session_id": "s1", "agent_id": "planner",
                            "messages": [{"role": "user", "content": "What is the weather in Oslo? " * 20}]},
                "state": "error", "submitted_at": NOW,
                "result": {"request_id": "r3", "status": "error", "model": "m", "provider": "b", "text": None,
                           "usage": {"prompt_tokens": 20, "completion_tokens": 0, "total_tokens": 20, "cost_usd": None},
                           "attempts": [{"number": 1, "provider": "a", "error_type": "RateLimited",
                                         "error_message": "slow down", "delay_s": 0.5, "latency_ms": 3.0, "ttft_ms": None},
                                        {"number": 2, "provider": "b", "error_type": "ProviderUnavailable",
                                         "error_message": "503", "delay_s": None, "latency_ms": 4.0, "ttft_ms": None}],
                           "error": {"type": "ProviderUnavailable", "message": "503"},
                           "started_at": NOW, "finished_at": NOW + 1}}


class Ledger:
    @hookimpl
    def ksi_request_details(self, request_id):
        if request_id != "r3":
            return None
        return {"calls": [{"attempt": 1, "provider": "a", "outcome": "RateLimited", "prompt_tokens": None,
                           "completion_tokens": None, "cost_usd": None, "latency_ms": 3.0},
                          {"attempt": 2, "provider": "b", "outcome": "ProviderUnavailable", "prompt_tokens": 20,
                           "completion_tokens": 0, "cost_usd": None, "latency_ms": 4.0}]}
'''


@pytest.fixture
def keeper(tmp_path: Path) -> tuple[Path, Path]:
    site = make_dist(tmp_path / "site", "ksi-keeper", "ksi_keeper", KEEPER,
                     {"keeper": "ksi_keeper:Keeper", "keeperledger": "ksi_keeper:Ledger"})
    db = tmp_path / "k.db"
    db.touch()
    return site, db


def test_show_prints_the_request_result_attempts_and_ledger(keeper: tuple[Path, Path]) -> None:
    site, db = keeper
    p = run_cli(["show", "r3", "--db", str(db)], site=site, env={"KSI_HOST_PLUGINS": "keeper,keeperledger"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("request r3: error")
    assert "agent_id: planner" in out and "What is the weather in Oslo?" in out
    assert "error ProviderUnavailable: 503" in out
    assert "  status error, model m, provider b, finish -, 20+0 tokens, cost unknown\n" in out  # no finish reason: "-", not "None"
    assert "RateLimited" in out and "slow down" in out  # the attempts
    assert "-- ledger" in out and "n/a" in out  # the ledger rows, unknown cost said
    as_json = run_cli(["show", "r3", "--json", "--db", str(db)], site=site, env={"KSI_HOST_PLUGINS": "keeper,keeperledger"})
    details = json.loads(as_json.stdout)
    assert details["state"] == "error" and len(details["calls"]) == 2 and len(details["result"]["attempts"]) == 2


def test_show_of_an_unknown_request_says_so_and_exits_1(keeper: tuple[Path, Path]) -> None:
    site, db = keeper
    p = run_cli(["show", "nope", "--db", str(db)], site=site, env={"KSI_HOST_PLUGINS": "keeper"})
    assert p.returncode == 1 and "no request 'nope' is known" in p.stderr


def test_logs_lists_newest_first_with_filters(keeper: tuple[Path, Path]) -> None:
    site, db = keeper
    env = {"KSI_HOST_PLUGINS": "keeper", "COLUMNS": "200"}
    p = run_cli(["logs", "--db", str(db)], site=site, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:5] == ["request", "session", "agent", "model", "status"]
    assert [line.split()[0] for line in lines[2:]] == ["r4", "r3", "r2", "r1", "r0"]
    p = run_cli(["logs", "-n", "1", "--status", "error", "--json", "--db", str(db)], site=site, env=env)
    assert [r["request_id"] for r in json.loads(p.stdout)] == ["r3"]
    p = run_cli(["logs", "--session", "s0", "--since", "200s", "--json", "--db", str(db)], site=site, env=env)
    assert [r["request_id"] for r in json.loads(p.stdout)] == ["r4", "r2"]
    bad = run_cli(["logs", "--status", "weird", "--db", str(db)], site=site, env=env)
    assert bad.returncode == 2


def test_logs_without_a_plugin_that_keeps_requests_says_what_to_install(keeper: tuple[Path, Path]) -> None:
    site, db = keeper
    p = run_cli(["logs", "--db", str(db)], site=site, env={"KSI_HOST_PLUGINS": "keeperledger"})
    assert p.returncode == 2 and "no plugin implements ksi_list_requests: install ksi-queue" in p.stderr


HOSTILE = '''
from ksi_host import hookimpl

EVIL = "x\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202eevil"  # set the title, clear the screen, a C1 CSI, a bidi override


class Hostile:
    @hookimpl
    def ksi_list_requests(self, query):
        return [{"request_id": EVIL, "session_id": EVIL, "agent_id": EVIL, "model": EVIL, "status": "ok",
                 "attempts": 1, "total_tokens": 1, "cost_usd": None, "latency_ms": 1.0, "submitted_at": 0.0}]

    @hookimpl
    def ksi_request_details(self, request_id):
        return {"request": {"request_id": EVIL, "model": EVIL, "purpose": EVIL, "metadata": {"k": EVIL},
                            "messages": [{"role": "user", "content": EVIL}]},
                "state": "error", "submitted_at": 0.0,
                "result": {"status": "error", "model": EVIL, "text": EVIL, "error": {"type": "X", "message": EVIL},
                           "attempts": [{"number": 1, "provider": EVIL, "error_message": EVIL}]}}

    @hookimpl
    def ksi_status(self):
        return {"circuits": [{"name": EVIL, "last_error": EVIL}], "queue": {"oldest": EVIL}}

    @hookimpl
    def ksi_usage_report(self, by, since):
        return [{"key": EVIL, "calls": 1, "requests": 1, "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                 "cost_usd": None}]
'''


@pytest.mark.parametrize("command", [["show", "r1"], ["logs"], ["status"], ["usage"]])
def test_what_requests_and_upstreams_wrote_cannot_drive_the_terminal(tmp_path: Path, command: list[str]) -> None:
    site = make_dist(tmp_path / "site", "ksi-hostile", "ksi_hostile", HOSTILE, {"hostile": "ksi_hostile:Hostile"})
    db = tmp_path / "k.db"
    db.touch()
    p = run_cli([*command, "--db", str(db)], site=site, env={"KSI_HOST_PLUGINS": "hostile", "COLUMNS": "400"})
    assert p.returncode == 0, p.stderr
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202eevil" in p.stdout  # shown, spelt out
    assert not any(c in p.stdout for c in "\x1b\x07\x9b\u202e")
