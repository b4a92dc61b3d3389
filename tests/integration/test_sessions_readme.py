"""The README's conversation batch runs as shown, offline, and its second line continues the first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ksi_it import ROOT, results

sys.path.insert(0, str(ROOT / "tests"))
from readme import snippet  # noqa: E402


def test_the_conversation_batch_runs_as_shown(tmp_path: Path) -> None:
    (tmp_path / "conversation.jsonl").write_text(snippet("jsonl", '"continue_session": true'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's ksi-host
    env["KSI_HOST_PLUGINS"] = "queue,litellm,retry,tokens,sessions"
    p = subprocess.run(snippet("sh", "ksi-host run conversation.jsonl"), shell=True, cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert [r["status"] for r in results(tmp_path / "results.jsonl")] == ["ok", "ok"]
    lines = p.stdout.splitlines()
    assert lines[0] == "session s1: 2 turn(s)"
    assert lines[1].startswith("turn 1  new conversation  request line1-")
    assert lines[2:5] == ["  system: Be brief.", "  user: My name is Ada.", "  assistant: mock response to: My name is Ada."]
    assert lines[5].startswith("turn 2  continued  request line2-")
    assert lines[6] == "  user: What is my name?" and len(lines) == 8
