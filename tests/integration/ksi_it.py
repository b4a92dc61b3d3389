"""Helpers of the integration tests: run ksi-host in a subprocess with every installed plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "requests.jsonl"


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE", "KSI_HOST_CONFIG", "KSI_HOST_DB")}
    e["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ksi_host.cli", *args], capture_output=True, text=True,
                          env=e, input=input, timeout=timeout, cwd=cwd)


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
