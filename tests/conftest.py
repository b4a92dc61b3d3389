"""Shared helpers of the host's own tests: tiny in-test plugins, installed as fake distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_dist(where: Path, dist: str, module: str, source: str, entry_points: dict[str, str], version: str = "0.1") -> Path:
    """Write ``module.py`` and a ``dist-info`` with ``ksi_host`` entry points into ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{module}.py").write_text(textwrap.dedent(source))
    info = where / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "[ksi_host]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    return where


FAKE_PLUGINS = '''
import asyncio
import attrs
from ksi_host import hookimpl, Usage, ProviderResponse, RateLimited, FailureDecision
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

class Queue:
    """Runs each request in a task, at most host.concurrency (default 16) at once."""

    def __init__(self):
        self.running = None
        self.tasks = set()

    @hookimpl
    def ksi_enqueue(self, host, request):
        from ksi_host import Ticket

        if self.running is None:
            self.running = asyncio.Semaphore(host.concurrency or 16)
        ticket = Ticket(request.request_id)

        async def run():
            async with self.running:
                try:
                    ticket.set_result(await host.execute(request))
                except BaseException as e:
                    ticket.set_exception(e)

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return ticket

async def _answer(request):
    text = request.messages[-1]["content"]
    if text == "crash":
        raise RuntimeError("provider bug")
    if text == "rate":
        raise RateLimited("slow down", retry_after=0.0)
    if text.startswith("slow"):
        await asyncio.sleep(0.05)
    return ProviderResponse(text="echo: " + text, usage=Usage(3, 2, 5, 0.001))

class Providers(ScriptedProviders):
    def __init__(self):
        super().__init__(FakeProvider("echo-main", model="echo*", script=[_answer]))

class Broken:
    @hookimpl
    def ksi_record_usage(self, call):
        raise KeyError("ledger bug")

@attrs.define
class RetryConfig:
    attempts: int = 1

class Retry:
    @hookimpl
    def ksi_config_spec(self):
        return ("fakeretry", RetryConfig)

    @hookimpl
    def ksi_handle_failure(self, error, attempt):
        return FailureDecision.give_up(error)

class Status:
    @hookimpl
    def ksi_status(self):
        return {"usage": {"calls": 3, "cost_usd": 0.00012150000000000001},
                "circuits": [{"name": "dep-a", "state": "open", "failures": 5, "last_error": "ProviderUnavailable: " + "x" * 280},
                             {"name": "dep-b", "state": "closed", "failures": 0, "last_error": None}]}

class UsageReport:
    @hookimpl
    def ksi_usage_report(self, by, since):
        rows = {"model": [{"key": "priced", "calls": 2, "requests": 2, "prompt_tokens": 10, "completion_tokens": 4,
                           "total_tokens": 14, "cost_usd": 0.0021, "unpriced_calls": 0},
                          {"key": "free", "calls": 3, "requests": 3, "prompt_tokens": 9, "completion_tokens": 3,
                           "total_tokens": 12, "cost_usd": None, "unpriced_calls": 3}],
                "total": [{"key": None, "calls": 5, "requests": 5, "prompt_tokens": 19, "completion_tokens": 7,
                           "total_tokens": 26, "cost_usd": 0.0021, "unpriced_calls": 3}]}
        return rows[by]
'''


@pytest.fixture
def fake_site(tmp_path: Path) -> Path:
    """A folder with a fake distribution ``ksi-fake`` providing plugins queue, echo, broken, retry (table
    ``[fakeretry]``), status (a cost and a long circuit error) and usage (an unpriced model)."""
    return make_dist(tmp_path / "site", "ksi-fake", "ksi_fake_plugins", FAKE_PLUGINS, {
        "fakequeue": "ksi_fake_plugins:Queue",
        "echo": "ksi_fake_plugins:Providers",
        "broken": "ksi_fake_plugins:Broken",
        "fakeretry": "ksi_fake_plugins:Retry",
        "fakestatus": "ksi_fake_plugins:Status",
        "fakeusage": "ksi_fake_plugins:UsageReport",
    })


def run_cli(args: list[str], *, site: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``ksi-host`` in a subprocess with ``site`` on PYTHONPATH."""
    e = dict(os.environ)
    e.pop("KSI_HOST_PLUGINS", None)
    e.pop("KSI_HOST_DISABLE", None)
    if site is not None:
        e["PYTHONPATH"] = os.pathsep.join([str(site), e.get("PYTHONPATH", "")])
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ksi_host.cli", *args], capture_output=True, text=True,
                          env=e, input=input, cwd=cwd, timeout=timeout)
