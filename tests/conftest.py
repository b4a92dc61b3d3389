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
from ksi_host import hookimpl, Usage, ProviderResponse, RateLimited, FailureDecision
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

class Queue(DirectQueue):
    pass

async def _answer(request):
    text = request.messages[-1]["content"]
    if text == "crash":
        raise RuntimeError("provider bug")
    if text == "rate":
        raise RateLimited("slow down", retry_after=0.0)
    return ProviderResponse(text="echo: " + text, usage=Usage(3, 2, 5, 0.001))

class Providers(ScriptedProviders):
    def __init__(self):
        super().__init__(FakeProvider("echo-main", model="echo*", script=[_answer]))

class Broken:
    @hookimpl
    def ksi_record_usage(self, call):
        raise KeyError("ledger bug")

class Retry:
    @hookimpl
    def ksi_handle_failure(self, error, attempt):
        return FailureDecision.give_up(error)
'''


@pytest.fixture
def fake_site(tmp_path: Path) -> Path:
    """A folder with a fake distribution ``ksi-fake`` providing plugins queue, echo, broken, retry."""
    return make_dist(tmp_path / "site", "ksi-fake", "ksi_fake_plugins", FAKE_PLUGINS, {
        "fakequeue": "ksi_fake_plugins:Queue",
        "echo": "ksi_fake_plugins:Providers",
        "broken": "ksi_fake_plugins:Broken",
        "fakeretry": "ksi_fake_plugins:Retry",
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
