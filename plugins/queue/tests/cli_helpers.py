"""``python -m ksi_host.cli`` subprocesses with the real queue and in-test plugins.

The in-test plugins are installed as a fake distribution (a module and a ``*.dist-info`` with
``ksi_host`` entry points on PYTHONPATH): ``logged``, a provider whose every call appends the
request id to the file ``$KSI_TEST_CALLS`` before it answers (after ``$KSI_TEST_DELAY_S``), and
``disklimit``, which lets the database grow by ``$KSI_TEST_EXTRA_PAGES`` pages only once the first request
ran (a disk that fills up while results are stored, whatever accepting the batch took).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

PLUGINS = "queue,logged,disklimit"

SOURCE = '''
import asyncio
import os

from ksi_host import ProviderInfo, ProviderResponse, Usage, hookimpl


class LoggedProvider:
    name = "logged"
    timeout_s = None

    async def complete(self, request, *, timeout_s):
        with open(os.environ["KSI_TEST_CALLS"], "a", encoding="utf-8") as f:
            f.write(request.request_id + "\\n")
        await asyncio.sleep(float(os.environ.get("KSI_TEST_DELAY_S", "0")))
        return ProviderResponse(text="answer to " + request.request_id, usage=Usage(3, 2, 5, 0.0))


class Logged:
    def __init__(self):
        self.provider = LoggedProvider()

    @hookimpl
    def ksi_select_provider(self, request, exclude):
        return None if self.provider.name in exclude else self.provider

    @hookimpl
    def ksi_list_providers(self, model):
        return [ProviderInfo("logged", "*", "logged")]


class DiskLimit:
    def __init__(self):
        self.limited = False

    @hookimpl
    async def ksi_request_finished(self, host):
        # the first request ran: the batch is stored, its results are about to be
        extra = os.environ.get("KSI_TEST_EXTRA_PAGES")
        if extra and not self.limited:
            self.limited = True
            pages = await host.db.pragma("page_count")
            await host.db.pragma(f"max_page_count = {pages + int(extra)}")
'''


def fake_site(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "ksi_queue_test_plugins.py").write_text(textwrap.dedent(SOURCE))
    info = where / "ksi_queue_test_plugins-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ksi-queue-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[ksi_host]\nlogged = ksi_queue_test_plugins:Logged\ndisklimit = ksi_queue_test_plugins:DiskLimit\n")
    return where


def env(site: Path, calls: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("KSI_HOST_DISABLE", "KSI_HOST_CONFIG", "KSI_HOST_DB")}
    e.update(KSI_HOST_PLUGINS=PLUGINS, KSI_TEST_CALLS=str(calls),
             PYTHONPATH=os.pathsep.join(p for p in (str(site), e.get("PYTHONPATH", "")) if p))
    e.update(extra)
    return e


def ksi(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ksi_host.cli", *map(str, args)]


def run(args: list[str], environ: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=environ, timeout=timeout)


def write_requests(path: Path, n: int, sessions: int, **fields: Any) -> Path:
    path.write_text("".join(json.dumps({"request_id": f"r{i:03d}", "session_id": f"s{i % sessions}", "model": "m",
                                        "prompt": f"question {i}", **fields}) + "\n" for i in range(n)))
    return path


def calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def wait_until_open(pids: list[int], db: Path, timeout: float = 30.0) -> None:
    """Return once each process has ``db`` open (from /proc); where /proc is absent, after a few seconds."""
    target = os.path.realpath(db)
    if not os.path.isdir("/proc/self/fd"):
        time.sleep(5)
        return
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting:
        assert time.monotonic() < deadline, f"processes {sorted(waiting)} never opened {db}"
        for pid in list(waiting):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        waiting.discard(pid)
                        break
                except OSError:
                    pass
        time.sleep(0.02)
