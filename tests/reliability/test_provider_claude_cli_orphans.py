"""SIGTERM or SIGKILL of a real ``ksi-host run`` leaves no ``claude`` process, nor anything it started.

A fake ``claude`` (``plugins/provider-claude-cli/tests/fake_claude.py``) first on PATH; a batch
whose requests hang: one starts a child and sleeps (``!hang``), one starts a child whose own
child calls ``setsid`` (``!setsid``). Once every process has noted its pid, the ``ksi-host run``
process is killed with the signal (SIGTERM twice: the first stops the batch gently, as Ctrl-C does, and
would let the hanging requests run to their timeout; the second stops it at once); then every noted
process must be gone within a few seconds.
Before the reaper, SIGTERM and SIGKILL orphaned all of them (SIGINT cleaned up); after SIGKILL,
the kernel's parent-death signal (``PR_SET_PDEATHSIG``, armed by the reaper) is what starts the
clean-up.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from rel import env, write_requests

FAKE = Path(__file__).resolve().parents[2] / "plugins" / "provider-claude-cli" / "tests" / "fake_claude.py"


def fake_claude() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_claude", FAKE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_ksi_host_run_leaves_no_claude_process_behind(tmp_path: Path, sig: signal.Signals) -> None:
    fake = fake_claude()
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    fake.install(bin_dir)
    config = tmp_path / "ksi.toml"
    config.write_text("[claude_cli]\nbuiltin = true\n")
    requests = write_requests(tmp_path / "requests.jsonl", [
        {"request_id": "r1", "model": "claude-cli/x", "prompt": "!hang", "session_id": "s1"},
        {"request_id": "r2", "model": "claude-cli/x", "prompt": "!setsid", "session_id": "s2"},
    ])
    environ = env(plugins="queue,claude_cli,retry,tokens",
                  extra={"PATH": f"{bin_dir}:{env()['PATH']}", "FAKE_CLAUDE_DIR": str(state)})
    args = [sys.executable, "-m", "ksi_host.cli", "run", str(requests), "--out", str(tmp_path / "out.jsonl"),
            "--db", str(tmp_path / "ksi.db"), "--config", str(config), "--concurrency", "2"]
    p = subprocess.Popen(args, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = fake.pids(state)
            if len(found.get("claude", [])) == 2 and "grandchild" in found:
                break
            assert p.poll() is None, p.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail(f"the fake CLI did not start its processes: {fake.pids(state)}")
        every = [pid for group in found.values() for pid in group]
        assert len(every) == 5 and all(fake.pid_alive(pid) for pid in every)  # 2 CLIs, 2 children, 1 grandchild
        p.send_signal(sig)
        if sig == signal.SIGTERM:  # the first stops gently (the hanging requests would finish); the second at once
            time.sleep(0.5)
            p.send_signal(sig)
        p.wait(30)
        assert p.returncode == (130 if sig == signal.SIGTERM else -sig)
        deadline = time.monotonic() + 5
        while any(fake.pid_alive(pid) for pid in every) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {role: [pid for pid in group if fake.pid_alive(pid)] for role, group in found.items()}
        assert not any(left.values()), f"outlived ksi-host run ({sig.name}): {json.dumps(left)}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
