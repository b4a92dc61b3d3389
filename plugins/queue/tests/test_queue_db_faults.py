"""The queue on a database that cannot do its job: ``ksi-host`` stops with one line naming the database and the
problem (exit 2 while starting, 1 once work ran), never a traceback; nothing acknowledged is lost, and running
the batch again on a sound database finishes it without sending a stored request again."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import calls, env, fake_site, ksi, query, run, write_requests
from ksi_queue import Plugin
from ksi_queue.schema import MIGRATIONS
from queue_helpers import req, status_of

from ksi_host import hookimpl
from ksi_host.errors import DatabaseError
from ksi_host.testing import FakeProvider, ScriptedProviders

N = 300


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def results(path: Path) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def test_a_full_disk_stops_the_batch_with_one_line_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    db, log = tmp_path / "k.db", tmp_path / "calls.log"
    site = fake_site(tmp_path / "site")
    requests = write_requests(tmp_path / "requests.jsonl", N, 20)
    out1, out2 = tmp_path / "out1.jsonl", tmp_path / "out2.jsonl"
    # 3 pages once the batch is stored and its first request ran: some of the 300 results fit (135 here), then the
    # disk is full (at 0 none fit; from 8 on all do). Counted from the start-up instead, the budget would also have
    # to fit the batch's rows, and move with every column or index they gain.
    p = run(ksi("run", requests, "--db", db, "--out", out1), env(site, log, KSI_TEST_EXTRA_PAGES="3"))
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    problem = f"database {db}: database or disk is full"
    first = results(out1)
    failed = [r for r in first.values() if r["status"] != "ok"]
    # the batch stops on it (a result could not be stored), or the requests it could not accept get it as their error
    assert p.stderr.strip().splitlines()[-1] == f"ksi-host: {problem}" or failed and all(
        r["error"] == {"type": "DatabaseError", "message": problem} for r in failed), (p.stderr, failed[:3])
    stored_ok = {r for (r,) in query(db, "SELECT request_id FROM ksi_queue_requests WHERE status = 'ok'")}
    assert 0 < len(stored_ok) < N
    assert {rid for rid, r in first.items() if r["status"] == "ok"} <= stored_ok  # nothing acknowledged is lost
    sent_first = calls(log)
    log.unlink()

    p = run(ksi("run", requests, "--db", db, "--out", out2), env(site, log))
    assert p.returncode == 0, p.stderr
    second = results(out2)
    assert sorted(second) == [f"r{i:03d}" for i in range(N)] and {r["status"] for r in second.values()} == {"ok"}
    assert not set(calls(log)) & stored_ok  # stored results are not sent again
    assert set(calls(log)) | set(sent_first) == set(second)
    assert query(db, "SELECT COUNT(*) FROM ksi_queue_requests WHERE status = 'ok'") == [(N,)]


def _database_with_rows(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    db, log = tmp_path / "k.db", tmp_path / "calls.log"
    environ = env(fake_site(tmp_path / "site"), log)
    assert run(ksi("run", write_requests(tmp_path / "requests.jsonl", N, 20), "--db", db, "--out", tmp_path / "o.jsonl"),
               environ).returncode == 0
    return db, environ


def test_a_damaged_database_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    db, environ = _database_with_rows(tmp_path)
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    with open(db, "r+b") as f:  # the header and the first pages (the schema) stay; the rest is overwritten
        f.seek(4 * page_size)
        f.write(b"\xa5" * (pages - 4) * page_size)
    p = run(ksi("run", tmp_path / "requests.jsonl", "--db", db, "--out", tmp_path / "o2.jsonl"), environ)
    assert p.returncode == 2, p.stderr
    assert one_line(p.stderr).startswith(f"ksi-host: database {db}: database disk image is malformed")
    p = run(ksi("status", "--db", db), environ)
    assert p.returncode in (1, 2) and one_line(p.stderr).startswith(f"ksi-host: database {db}: database disk image is malformed")


def test_queue_tables_newer_than_the_code_stop_the_start(tmp_path: Path) -> None:
    db, environ = _database_with_rows(tmp_path)
    con = sqlite3.connect(db)
    con.execute("UPDATE ksi_schema_versions SET version = 9 WHERE owner = 'ksi-queue'")
    con.commit()
    con.close()
    p = run(ksi("run", tmp_path / "requests.jsonl", "--db", db), environ)
    assert p.returncode == 2
    assert one_line(p.stderr) == (f"ksi-host: database {db}: the tables of ksi-queue are at schema version 9, newer than "
                                  f"this code knows ({len(MIGRATIONS)}): was it written by a newer ksi-queue?")


class BrokenLedger:
    """A plugin whose table cannot be written (``ksi_record_usage`` raises DatabaseError) while ``broken``."""

    def __init__(self) -> None:
        self.broken = True

    @hookimpl
    def ksi_record_usage(self, host: Any, call: Any) -> None:
        if self.broken:
            raise DatabaseError(host.db.path, "database or disk is full")


async def test_a_database_failure_while_running_leaves_the_request_unfinished_for_the_next_start(
        make_host: Any, ksi_db_path: Any) -> None:
    provider = FakeProvider("p1")
    ledger = BrokenLedger()
    async with make_host(Plugin(), ScriptedProviders(provider), ledger) as host:
        for rid in ("r0", "r1"):  # (the session moves on after r0)
            with pytest.raises(DatabaseError, match="database or disk is full"):  # an OperationalError: exit 1, one line
                await host.complete(req(rid, "A"))
    # no error result was stored: they run again at the next start
    assert [status_of(ksi_db_path, rid) in ("queued", "running") for rid in ("r0", "r1")] == [True, True]
    ledger.broken = False
    async with make_host(Plugin(), ScriptedProviders(provider), ledger) as host:
        assert [(await host.complete(req(rid, "A"))).ok for rid in ("r0", "r1")] == [True, True]
    assert [status_of(ksi_db_path, rid) for rid in ("r0", "r1")] == ["ok", "ok"]
