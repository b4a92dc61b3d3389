"""Cancel and clear a session from another process while a real process serves the queue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ksi_queue import Plugin

WORKER = Path(__file__).with_name("sigkill_worker.py")
N, SESSIONS, DELAY_S, CONCURRENCY = 45, 3, 0.08, 3


async def test_cancel_and_clear_from_another_process_reach_the_serving_one(make_host: Any, tmp_path: Path) -> None:
    db, log = tmp_path / "queue.db", tmp_path / "calls.log"
    server = subprocess.Popen([sys.executable, str(WORKER), str(db), str(log), str(N), str(SESSIONS), str(DELAY_S),
                               str(CONCURRENCY)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().split()[0] == "RESTORED"
        assert server.stdout.readline().strip() == "SUBMITTED"
        async with make_host(Plugin(), serve=False, db_path=db) as cli:  # what `ksi-host cancel` opens
            status = (await cli.status())["queue"]
            assert status["served_by_pid"] == server.pid
            assert await cli.cancel("s0-013") is True
            cleared = await cli.clear_session("s1")
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0
    done = json.loads(next(line for line in out.splitlines() if line.startswith("DONE "))[5:])
    cancelled = {rid for rid, s in done.items() if s == "cancelled"}
    assert "s0-013" in cancelled and 1 <= cleared <= N // SESSIONS
    assert {rid for rid in cancelled if rid.startswith("s1-")} == {f"s1-{i:03d}" for i in range(N // SESSIONS - cleared, N // SESSIONS)}
    assert not cancelled & set(log.read_text().split())  # never sent
    assert all(s == "ok" for rid, s in done.items() if rid not in cancelled)
