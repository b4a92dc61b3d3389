"""The README's ``ksi-host serve`` example runs as shown: the command (on any free port instead of 8787, so
the test never meets another server) and the five-line ``openai`` client against it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ksi_it import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from readme import snippet  # noqa: E402


def test_the_serve_example_runs_as_shown(tmp_path: Path) -> None:
    command = snippet("sh", "ksi-host serve --db").strip().split("#")[0].strip()
    install, _, serve = command.partition(" && ")
    assert install == "pip install -e plugins/serve" and (ROOT / "plugins" / "serve" / "pyproject.toml").exists()
    words = shlex.split(serve)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    env.update(KSI_HOST_PLUGINS="queue,litellm,retry,tokens,serve", OTEL_TRACES_EXPORTER="none",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    args = [w for w in words if "=" not in w or w.startswith("-")]
    assert args[:2] == ["ksi-host", "serve"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        server = subprocess.Popen([*args, "--listen", "127.0.0.1:0"], cwd=tmp_path, env=env, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"listening on http://(\S+)", log.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        client = snippet("python", 'base_url="http://127.0.0.1:8787/v1"').replace("127.0.0.1:8787", m.group(1))
        p = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout == "mock response to: hi\n"
    finally:
        server.terminate()
        assert server.wait(60) == 0, log.read_text()
    assert (tmp_path / "serve.db").exists()
