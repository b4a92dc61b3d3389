"""The README's snippets that need the four plugins run as shown: "Using it from Python", the main
job's shell command (past its install steps, whose folders must exist) and the example config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ksi_it import ROOT, results

sys.path.insert(0, str(ROOT / "tests"))
from readme import snippet  # noqa: E402

PLUGINS = {"KSI_HOST_PLUGINS": "queue,litellm,retry,tokens", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's ksi-host
    return {**env, **PLUGINS}


def test_using_it_from_python_runs_as_shown(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-c", snippet("python", "asyncio.run(main())")], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("ok mock response to: hi") and lines[1] == "ok mock response to: and now?"
    assert (tmp_path / "ksi-host.db").exists()


def test_the_main_job_runs_as_shown(tmp_path: Path) -> None:
    steps = snippet("sh", "examples/requests.jsonl").strip().split(" && ")
    install = [s for s in steps if s.startswith(("python3 -m venv", ". .venv/bin/activate", "pip install"))]
    assert steps[: len(install)] == install  # the set-up comes first ...
    for folder in install[-1].split()[2:]:
        if folder != "-e":
            assert (ROOT / folder / "pyproject.toml").exists(), folder  # ... and installs folders of this checkout
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    p = subprocess.run(" && ".join(steps[len(install):]), shell=True, cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert len(results(tmp_path / "results.jsonl")) == len((ROOT / "examples" / "requests.jsonl").read_text().splitlines())
    assert p.stdout.splitlines()[0].split()[:3] == ["agent", "calls", "requests"]  # the usage table


def test_the_real_provider_config_is_valid(tmp_path: Path) -> None:
    block = snippet("sh", "--config examples/ksi-host.toml")
    assert "OPENAI_API_KEY" in block
    (tmp_path / "k.db").touch()  # status opens an existing database only
    p = subprocess.run([sys.executable, "-m", "ksi_host.cli", "status", "--config", str(ROOT / "examples" / "ksi-host.toml"),
                        "--db", str(tmp_path / "k.db")], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_the_ask_example_runs_as_shown(tmp_path: Path) -> None:
    block = snippet("sh", "ksi-host ask hello").strip()
    assert block == "ksi-host ask hello --model mock/gpt-4o-mini"  # nothing before it but the main job's install
    p = subprocess.run(block, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "mock response to: hello\n"
    assert p.stderr.startswith("ksi-host: ok: 8 prompt + 5 completion = 13 tokens, cost $") and "provider mock" in p.stderr
    assert (tmp_path / "ksi-host.db").exists()  # the default database, as the other commands use


def test_the_openai_batch_example_runs_as_shown(tmp_path: Path) -> None:
    import json

    block = snippet("sh", "cat > batch.jsonl")
    p = subprocess.run(block, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    out = {o["custom_id"]: o for o in results(tmp_path / "batch-results.jsonl")}
    assert set(out) == {"q1", "q2"} and all(o["error"] is None and o["response"]["status_code"] == 200 for o in out.values())
    body = out["q1"]["response"]["body"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "mock response to: hello"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}  # as the README shows it
    u = subprocess.run([sys.executable, "-m", "ksi_host.cli", "usage", "--db", str(tmp_path / "example.db"), "--by", "agent",
                        "--json"], env=_env(), capture_output=True, text=True, timeout=120)
    assert {r["key"]: r["calls"] for r in json.loads(u.stdout)} == {None: 1, "me": 1}  # the ksi object's agent_id
