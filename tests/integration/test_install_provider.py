"""Installing a provider plugin is all it takes: pip install, the host lists it and routes its models to it.

``test_install_run_and_uninstall_in_a_fresh_venv`` builds a fresh virtual
environment (``uv venv --seed``), installs the host, ksi-queue,
ksi-provider-openai and ksi-provider-claude-cli from this checkout (not
editable: as a user would), and drives the installed ``ksi-host``:
``plugins`` lists both, ``run`` routes ``gpt-test`` to the openai plugin
(a local OpenAI-compatible server) and ``claude-cli/sonnet`` to the
claude_cli plugin (a fake ``claude``), the config's ``priority`` decides which
plugin serves a model both serve, and ``pip uninstall`` removes a plugin
cleanly (``ksi-host`` then refuses its config table, exit 2).

``test_beside_litellm_the_config_decides`` runs in this environment, with
ksi-provider-litellm installed too: both plugins serve one model from the
local server, and swapping ``priority`` swaps which one answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {  # distribution -> source folder
    "ksi-host": ROOT,
    "ksi-queue": ROOT / "plugins" / "queue",
    "ksi-provider-openai": ROOT / "plugins" / "provider-openai",
    "ksi-provider-claude-cli": ROOT / "plugins" / "provider-claude-cli",
}


def _fake_claude() -> Any:
    spec = importlib.util.spec_from_file_location("fake_claude", ROOT / "plugins" / "provider-claude-cli" / "tests" / "fake_claude.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE", "KSI_HOST_CONFIG", "KSI_HOST_DB", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(extra)
    return env


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.python = path / "bin" / "python"
        self.ksi_host = path / "bin" / "ksi-host"

    def run(self, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env or _clean_env(), timeout=timeout)

    def site_packages(self) -> Path:
        out = self.run(self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    uv = shutil.which("uv")
    assert uv is not None, "uv is needed to build the fresh environment (pip install uv)"
    v = Venv(tmp_path_factory.mktemp("install") / "venv")
    made = subprocess.run([uv, "venv", "--seed", "-q", "-p", sys.executable, str(v.path)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    # --refresh-package: build the local folders now, never reuse a wheel uv cached from older sources
    refresh = [a for name in LOCAL for a in ("--refresh-package", name)]
    done = subprocess.run([uv, "pip", "install", "-q", "--python", str(v.python), *refresh, *map(str, LOCAL.values())],
                          capture_output=True, text=True, timeout=300, env=_clean_env())
    assert done.returncode == 0, done.stderr
    return v


@pytest.fixture
def server(venv: Venv) -> Iterator[str]:
    """The local OpenAI-compatible server, run by the fresh environment's python; yields its /v1 URL."""
    p = subprocess.Popen([str(venv.python), "-m", "ksi_host.testing.server", "--port", "0"], stdout=subprocess.PIPE, text=True,
                         env=_clean_env())
    try:
        assert p.stdout is not None
        yield json.loads(p.stdout.readline())["url"]
    finally:
        p.terminate()
        p.wait(timeout=10)


def _toml(config: dict[str, Any]) -> str:
    """A tiny TOML writer for the config tables these tests use."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines: list[str] = []
    for table, body in config.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items() if not isinstance(v, list) or not v or not isinstance(v[0], dict)]
        for k, v in body.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"[[{table}.{k}]]")
                    lines += [f"{kk} = {value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _results(path: Path) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_install_run_and_uninstall_in_a_fresh_venv(venv: Venv, server: str, tmp_path: Path) -> None:
    # the installed code is this checkout's (not a stale build)
    site = venv.site_packages()
    for pkg, folder in (("ksi_provider_openai", "provider-openai"), ("ksi_provider_claude_cli", "provider-claude-cli")):
        assert (site / pkg / "plugin.py").read_text() == (ROOT / "plugins" / folder / pkg / "plugin.py").read_text()

    listed = venv.run(venv.ksi_host, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"queue", "openai", "claude_cli"}
    assert rows["openai"]["distribution"] == "ksi-provider-openai" and "ksi_select_provider" in rows["openai"]["hooks"]
    assert rows["claude_cli"]["distribution"] == "ksi-provider-claude-cli"

    fake = _fake_claude()
    claude = fake.install(tmp_path / "bin")
    env = _clean_env(FAKE_CLAUDE_DIR=str(tmp_path / "fake-state"), KSI_TEST_OPENAI_KEY="sk-test-install-0123456789")

    def config(openai_priority: int, claude_priority: int) -> Path:
        path = tmp_path / f"ksi-{openai_priority}-{claude_priority}.toml"
        path.write_text(_toml({
            "openai": {"priority": openai_priority, "deployments": [
                {"name": "oa-main", "model": "gpt-test", "api_base": server, "api_key_env": "KSI_TEST_OPENAI_KEY", "timeout_s": 10},
                {"name": "oa-shared", "model": "shared-model", "api_base": server, "timeout_s": 10}]},
            "claude_cli": {"executable": str(claude), "priority": claude_priority, "deployments": [
                {"name": "cc-shared", "model": "shared-model", "timeout_s": 20}]},
        }))
        return path

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"request_id": "oa", "model": "gpt-test", "prompt": "hello openai"},
        {"request_id": "cc", "model": "claude-cli/sonnet", "prompt": "hello claude", "session_id": "s1"},
        {"request_id": "shared", "model": "shared-model", "prompt": "who answers?"},
    ]) + "\n")

    out = tmp_path / "results-a.jsonl"
    ran = venv.run(venv.ksi_host, "run", requests, "--out", out, "--config", config(1, 2), "--db", tmp_path / "a.db", env=env)
    assert ran.returncode == 0, ran.stderr
    results = _results(out)
    assert (results["oa"]["provider"], results["oa"]["text"]) == ("oa-main", "echo: hello openai")
    assert results["oa"]["usage"]["total_tokens"] > 0
    assert (results["cc"]["provider"], results["cc"]["text"], results["cc"]["session_id"]) == (
        "claude-cli", "turn 1: echo: hello claude", "s1")
    assert results["shared"]["provider"] == "oa-shared"  # openai priority 1 < claude_cli priority 2

    out = tmp_path / "results-b.jsonl"
    ran = venv.run(venv.ksi_host, "run", requests, "--out", out, "--config", config(2, 1), "--db", tmp_path / "b.db", env=env)
    assert ran.returncode == 0, ran.stderr
    assert _results(out)["shared"]["provider"] == "cc-shared"  # the config swapped the order

    # pip uninstall removes the plugin cleanly
    gone = venv.run(venv.python, "-m", "pip", "uninstall", "-y", "ksi-provider-openai")
    assert gone.returncode == 0, gone.stderr
    assert not list(site.glob("ksi_provider_openai*")), "files of the uninstalled plugin are left behind"
    listed = venv.run(venv.ksi_host, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"] for r in json.loads(listed.stdout)} == {"queue", "claude_cli"}
    # its config table now stops the run before anything runs (exit 2), naming the table
    ran = venv.run(venv.ksi_host, "run", requests, "--out", tmp_path / "c.jsonl", "--config", config(1, 2),
                   "--db", tmp_path / "c.db", env=env)
    assert ran.returncode == 2, ran.stderr
    assert "config table [openai]: unknown table, no loaded plugin declares it" in ran.stderr

    # with the last provider plugin gone too, ksi-host run says which plugin to install
    gone = venv.run(venv.python, "-m", "pip", "uninstall", "-y", "ksi-provider-claude-cli")
    assert gone.returncode == 0, gone.stderr
    assert not list(site.glob("ksi_provider_claude_cli*"))
    ran = venv.run(venv.ksi_host, "run", requests, "--out", tmp_path / "d.jsonl", "--db", tmp_path / "d.db", env=env)
    assert ran.returncode == 2
    # (installed from wheels, the host knows no checkout: the hint says where the plugins are)
    assert ("no plugin implements ksi_select_provider: install ksi-provider-litellm from a KSI host checkout "
            "(pip install -e plugins/<its folder>)") in ran.stderr


async def test_beside_litellm_the_config_decides(openai_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ksi_host import Host

    monkeypatch.setenv("KSI_HOST_PLUGINS", "queue,litellm,openai,retry,tokens")
    monkeypatch.setenv("KSI_TEST_BESIDE_KEY", "sk-test-beside-0123456789")

    def config(openai_priority: int) -> dict[str, Any]:
        return {
            "litellm": {"deployments": [{"name": "lit", "model": "gpt-test", "litellm_model": "openai/gpt-test",
                                         "api_base": openai_server.url, "api_key_env": "KSI_TEST_BESIDE_KEY"}]},
            "openai": {"priority": openai_priority, "deployments": [
                {"name": "oa", "model": "gpt-test", "api_base": openai_server.url, "api_key_env": "KSI_TEST_BESIDE_KEY"}]},
        }

    # litellm states no priority: it ranks at 100
    for priority, want in ((1, "oa"), (500, "lit")):
        async with Host(config(priority), tmp_path / f"beside-{priority}.db") as host:
            assert {p.name for p in host.plugins} >= {"litellm", "openai"}
            r = await host.complete({"model": "gpt-test", "prompt": "hello"})
            assert r.ok and r.provider == want and r.text == "echo: hello", r
            # when the preferred one fails, the other serves (failover across plugins)
            openai_server.script("503")
            r = await host.complete({"model": "gpt-test", "prompt": "again"})
            assert r.ok and [a.provider for a in r.attempts] == [want, {"oa": "lit", "lit": "oa"}[want]], r.attempts
