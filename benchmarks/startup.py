"""startup: wall time of ``ksi-host plugins`` and ``ksi-host --help`` against ``python -c pass``.

Each command runs R times, interleaved, as a fresh process; the medians are
compared. ``ksi-host`` is the console script installed beside this Python
(not a shim on PATH such as pyenv's, which adds its own start-up). Each command
also runs once under ``python -X importtime``, which lists every module it
imported: litellm (and openai, httpx, aiohttp) must not be among them.

Two settings:

* ``bytecode cache``: the modules' compiled bytecode is cached, as after any
  ordinary ``pip install`` (a temporary ``PYTHONPYCACHEPREFIX``, warmed once).
* ``project not compiled``: ``PYTHONDONTWRITEBYTECODE=1`` and no cache prefix,
  as in this sandbox (and tox.ini): Python and site-packages have their
  installed bytecode, but the project's editable sources are compiled again
  by every run.

Target: each command under 0.3 s more than ``python -c pass``, and neither
imports litellm.

    python benchmarks/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

TARGET_EXTRA_S = 0.3
HEAVY = ("litellm", "openai", "httpx", "aiohttp")


def console_script() -> list[str]:
    """The ``ksi-host`` console script of this Python, run with this Python."""
    beside = Path(sys.executable).parent / "ksi-host"
    if beside.exists():
        return [sys.executable, str(beside)]
    found = shutil.which("ksi-host")
    if found is None:
        raise SystemExit("ksi-host is not installed (pip install -e .)")
    return [found]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def imported(cmd: list[str], env: dict[str, str]) -> set[str]:
    """Top-level names of every module ``cmd`` imports (``python -X importtime``)."""
    if cmd[0] != sys.executable:
        cmd = [sys.executable, *cmd]
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True, check=True)
    names = set()
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="runs of each command per setting (default 15)")
    args = ap.parse_args()

    script = console_script()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "ksi-host --help": [*script, "--help"],
        "ksi-host plugins": [*script, "plugins"],
    }
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    base_env["KSI_HOST_PLUGINS"] = common.PLUGINS
    base_env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    rows = []
    verdicts = []
    heavy_found: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as cache:
        settings = {
            "bytecode cache": {**base_env, "PYTHONPYCACHEPREFIX": cache},
            "project not compiled": {**base_env, "PYTHONDONTWRITEBYTECODE": "1"},
        }
        for cmd in commands.values():  # warm the cache (and the OS file cache) once
            timed(cmd, settings["bytecode cache"])
        for setting, env in settings.items():
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, cmd in commands.items():
                    times[name].append(timed(cmd, env))
            base = common.median(times["python -c pass"])
            for name, ts in times.items():
                med = common.median(ts)
                extra = med - base
                rows.append([setting, name, med, min(ts), max(ts), extra if name != "python -c pass" else ""])
                if name != "python -c pass":
                    verdicts.append((setting, name, extra))
        for name, cmd in commands.items():
            if name != "python -c pass":
                heavy_found[name] = sorted(set(HEAVY) & imported(cmd, settings["bytecode cache"]))
    print(f"startup: {args.runs} runs of each command per setting, interleaved; plugins {common.PLUGINS}; "
          f"{' '.join(script)}; load average {common.load_average()}")
    print(common.table(["setting", "command", "median s", "min s", "max s", "more than python -c pass, s"], rows))
    for name, found in heavy_found.items():
        print(f"{name} imports {', '.join(found) if found else 'none of ' + ', '.join(HEAVY)}")
    for setting, name, extra in verdicts:
        ok = extra < TARGET_EXTRA_S and not heavy_found[name]
        print(f"target {name} under {TARGET_EXTRA_S} s more than python -c pass, without litellm ({setting}): "
              f"{common.verdict(ok)} (+{extra:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
