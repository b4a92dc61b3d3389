"""One process serves a database: claiming the queue, and the writes of processes that do not serve it,
check the owner row in the transaction that writes (real ``ksi-host`` processes, and hosts of this process
whose start is slipped in between another host's read of the owner row and its write)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import ksi_queue.plugin as queue_plugin
import pytest
from cli_helpers import calls, env, fake_site, ksi, query, wait_until_open, write_requests
from ksi_queue import Plugin, schema
from queue_helpers import GatedProvider, req, status_of, stored_only

from ksi_host.testing import ScriptedProviders

N, SESSIONS = 60, 10


def _finish(procs: list[subprocess.Popen[str]]) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _check_one_served(procs: list[subprocess.Popen[str]], outs: list[tuple[str, str]], db: Path, log: Path) -> None:
    """Exactly one process ran the batch; each other one exited 2 naming a serving process; every request
    reached the upstream once and has one result and one attempt row."""
    codes = [p.returncode for p in procs]
    assert all(c in (0, 2) for c in codes) and 0 in codes, outs
    for p, (_, err) in zip(procs, outs, strict=True):
        assert "Traceback" not in err, err
        if p.returncode == 2:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith(f"ksi-host: ksi-queue: the queue in {db} is served by process "), err
            served_by = int(err.split("served by process ")[1].split()[0])
            assert served_by in [q.pid for q in procs if q.returncode == 0]
    assert sorted(calls(log)) == [f"r{i:03d}" for i in range(N)]  # no request reached the upstream twice
    assert query(db, "SELECT COUNT(*) FROM ksi_queue_requests WHERE status = 'ok'") == [(N,)]
    assert query(db, "SELECT COUNT(*) FROM ksi_queue_attempts") == [(N,)]


async def test_two_runs_started_together_while_the_database_is_locked_one_serves(make_host: Any, ksi_db_path: Path,
                                                                               tmp_path: Path) -> None:
    async with make_host(Plugin()):  # the queue's tables exist; nobody serves
        pass
    log = tmp_path / "calls.log"
    requests = write_requests(tmp_path / "requests.jsonl", N, SESSIONS)
    environ = env(fake_site(tmp_path / "site"), log, KSI_TEST_DELAY_S="0.05")
    lock = sqlite3.connect(ksi_db_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another connection holds the write lock while both start
    procs = [subprocess.Popen(ksi("run", requests, "--db", ksi_db_path, "--out", tmp_path / f"out{i}.jsonl"), env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        wait_until_open([p.pid for p in procs], ksi_db_path)
        time.sleep(1.0)  # both have read the owner row (none) and wait for the write lock to claim the queue
    finally:
        lock.execute("COMMIT")
        lock.close()
    outs = _finish(procs)
    assert sorted(p.returncode for p in procs) == [0, 2], outs
    _check_one_served(procs, outs, ksi_db_path, log)


def test_runs_started_together_on_a_fresh_database_send_each_request_once(tmp_path: Path) -> None:
    db, log = tmp_path / "fresh.db", tmp_path / "calls.log"
    requests = write_requests(tmp_path / "requests.jsonl", N, SESSIONS)
    environ = env(fake_site(tmp_path / "site"), log, KSI_TEST_DELAY_S="0.05")
    procs = [subprocess.Popen(ksi("run", requests, "--db", db, "--out", tmp_path / f"out{i}.jsonl"), env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = _finish(procs)
    _check_one_served(procs, outs, db, log)  # (migrations included: each script ran once, none failed)
    for i, p in enumerate(procs):
        if p.returncode == 0:
            assert sorted(json.loads(x)["status"] for x in (tmp_path / f"out{i}.jsonl").read_text().splitlines()) == ["ok"] * N


@contextlib.asynccontextmanager
async def server_starts_after_reading_the_owner_row(host: Any, start: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """While inside: the next time ``host`` reads the owner row, ``start()`` runs right after the read (a
    serving process starting between that read and whatever ``host`` writes next)."""
    read = host.db.fetchone
    armed = True

    async def fetchone(sql: str, params: Any = ()) -> Any:
        nonlocal armed
        row = await read(sql, params)
        if sql == schema.SELECT_OWNER and armed:
            armed = False
            await start()
        return row

    host.db.fetchone = fetchone
    try:
        yield
    finally:
        host.db.fetchone = read


async def test_a_cancel_that_reports_success_while_a_server_starts_leaves_the_request_cancelled(
        make_host: Any, ksi_db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ksi-host cancel r0`` reads no owner; a server then starts and runs r0; only then does the cancel
    write. It must not report a cancel that the server's result overwrites: it asks the server."""
    monkeypatch.setattr(queue_plugin, "COMMAND_POLL_S", 0.01)
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as h:
        await h.submit(req("r0"))
    gate = GatedProvider()
    async with contextlib.AsyncExitStack() as stack:
        async def start_server() -> None:
            await stack.enter_async_context(make_host(Plugin(), ScriptedProviders(gate)))
            await gate.wait_calls(1)  # the server restored r0 and runs it

        async with make_host(Plugin(), serve=False) as cli:
            async with server_starts_after_reading_the_owner_row(cli, start_server):
                cancelled = await cli.cancel("r0")
        gate.release_all()
    assert gate.calls == ["r0"]
    assert cancelled is True and status_of(ksi_db_path, "r0") == "cancelled"  # the server cancelled the running r0


async def test_a_clear_session_while_a_server_starts_goes_through_it(make_host: Any, ksi_db_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_plugin, "COMMAND_POLL_S", 0.01)
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as h:
        for i in range(3):
            await h.submit(req(f"a{i}", "A"))
    gate = GatedProvider()
    async with contextlib.AsyncExitStack() as stack:
        async def start_server() -> None:
            await stack.enter_async_context(make_host(Plugin(), ScriptedProviders(gate)))
            await gate.wait_calls(1)  # a0 runs; a1 and a2 wait in the server's memory

        async with make_host(Plugin(), serve=False) as cli:
            async with server_starts_after_reading_the_owner_row(cli, start_server):
                cleared = await cli.clear_session("A")
        gate.release_all()
    assert cleared == 2 and gate.calls == ["a0"]
    assert [status_of(ksi_db_path, f"a{i}") for i in range(3)] == ["ok", "cancelled", "cancelled"]


async def test_a_submit_while_a_server_starts_is_refused_and_numbers_no_row_the_server_uses(
        make_host: Any, ksi_db_path: Path) -> None:
    stored_only(ksi_db_path)
    gate = GatedProvider(open=True)
    async with contextlib.AsyncExitStack() as stack:
        servers: list[Any] = []

        async def start_server() -> None:
            servers.append(await stack.enter_async_context(make_host(Plugin(), ScriptedProviders(gate))))

        async with make_host(Plugin(), serve=False) as cli:
            async with server_starts_after_reading_the_owner_row(cli, start_server):
                with pytest.raises(queue_plugin.ServedElsewhere, match="served by process"):
                    await cli.submit(req("late"))
        assert (await servers[0].complete(req("fresh"))).ok  # its row number was not taken behind its back
    assert status_of(ksi_db_path, "late") is None and gate.calls == ["fresh"]


def test_status_from_another_process_counts_the_requests_in_flight(tmp_path: Path) -> None:
    """A serving process runs three long requests at once; ``ksi-host status`` elsewhere shows in_flight 3
    (from the rows marked running); once that process is gone, nothing is in flight."""
    db, log = tmp_path / "queue.db", tmp_path / "calls.log"
    worker = Path(__file__).with_name("sigkill_worker.py")
    server = subprocess.Popen([sys.executable, str(worker), str(db), str(log), "9", "3", "2.0", "3"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().split()[0] == "RESTORED"
        assert server.stdout.readline().strip() == "SUBMITTED"

        async def status() -> dict[str, Any]:
            from ksi_host import Host

            async with Host({}, db, plugins=[Plugin()], serve=False) as cli:  # what `ksi-host status` opens
                return (await cli.status())["queue"]

        deadline = time.monotonic() + 10
        while (q := asyncio.run(status()))["in_flight"] != 3:
            assert time.monotonic() < deadline, q
            time.sleep(0.05)
        assert (q["running"], q["queued"], q["served_by_pid"]) == (3, 6, server.pid)
        server.send_signal(signal.SIGKILL)
        server.wait()
        q = asyncio.run(status())
        assert (q["in_flight"], q["running"], q["served_by_pid"]) == (0, 3, None)  # left running: they run again
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
