"""Helpers shared by the benchmark scripts: the local server process, tables, verdicts.

Not a benchmark itself. The scripts put ``benchmarks/`` first on ``sys.path``
(they are run as ``python benchmarks/<name>.py``), so ``import common`` works.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PLUGINS = "queue,litellm,retry,tokens"
"""The four plugins of the project (other installed provider plugins are left out)."""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; numbers right-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: Sequence[str], raw: Sequence[Any] | None = None) -> str:
        out = []
        for i, v in enumerate(values):
            right = raw is not None and isinstance(raw[i], (int, float)) and not isinstance(raw[i], bool)
            out.append(v.rjust(widths[i]) if right else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [line(headers), "  ".join("-" * w for w in widths)]
    lines += [line(c, r) for c, r in zip(cells, rows, strict=True)]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _idle_ticks() -> dict[int, int]:
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks[int(name[3:])] = int(values[3]) + int(values[4])  # idle + iowait
    return ticks


def pin_to_one_core(sample_s: float = 0.5) -> int | None:
    """Pin this process (all its threads, including SQLite's) to one CPU; return it (None if unsupported).

    The machine may be shared: of the CPUs that were (nearly) as idle as the idlest over the last
    ``sample_s`` seconds, the one that ran :func:`reference_ms`'s loop fastest right now is chosen.
    (On this VM a vCPU whose physical core is busy elsewhere runs the same code up to twice as slow.)"""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[0]
    try:
        before = _idle_ticks()
        time.sleep(sample_s)
        after = _idle_ticks()
        idle = {c: after.get(c, 0) - before.get(c, 0) for c in allowed}
        quiet = [c for c in allowed if idle[c] >= 0.8 * max(idle.values())]
        speed = {}
        for c in quiet:
            os.sched_setaffinity(0, {c})
            speed[c] = reference_ms(repeat=3)
        cpu = min(quiet, key=lambda c: (speed[c], c))
    except OSError:
        pass
    os.sched_setaffinity(0, {cpu})
    return cpu


@contextmanager
def local_server(delay_s: float = 0.0, cpu: int | None = None) -> Iterator[str]:
    """``python -m ksi_host.testing.server`` in its own process; yields its ``/v1`` URL.

    ``cpu``: pin the server to this CPU, so it does not share a core with the client being measured.
    """
    cmd = [sys.executable, "-m", "ksi_host.testing.server", "--port", "0", "--delay", str(delay_s)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(server.pid, {cpu})
        assert server.stdout is not None
        yield json.loads(server.stdout.readline())["url"]
    finally:
        server.terminate()
        server.wait()


def run_json(args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <args>`` and parse the last line of its stdout as JSON (stderr passes through)."""
    p = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def reference_ms(repeat: int = 5) -> float:
    """CPU milliseconds of a fixed pure-Python loop (dict, tuple and str work), the best of ``repeat``.

    Printed beside results as a yardstick of this machine's speed at the time: on a shared VM the
    same code runs up to twice as slow from one minute to the next, and this shows when it did."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        d: dict[int, tuple[int, str]] = {}
        keep: list[Any] = []
        for i in range(50_000):
            d[i & 1023] = (i, str(i))
            keep.append(d.get(i & 511))
            if len(keep) > 1000:
                keep.clear()
        best = min(best, time.process_time() - t0)
    return best * 1000


def load_average() -> str:
    """The 1-minute load average, to print beside the numbers (other work on the machine skews them)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"
