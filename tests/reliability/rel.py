"""Helpers of the reliability tests: the local server, configs, ``ksi-host`` subprocesses, reading back.

The server runs in a thread of the test process (:class:`OpenAIServer` with
``keep_bodies``), so a test reads its arrival log directly: which request
(by its prompt) arrived when, which fault it got, when it was answered and
with what usage. ``ksi-host`` runs in subprocesses with the four reference
plugins only (``KSI_HOST_PLUGINS``), plus whatever a test adds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ksi_host.testing.server import Arrival

PLUGINS = "queue,litellm,retry,tokens"
KEY_ENV = "KSI_REL_KEY"
PYCACHE = Path(tempfile.gettempdir()) / "ksi-reliability-pycache"
"""Where the ``ksi-host`` subprocesses keep their bytecode. tox sets PYTHONDONTWRITEBYTECODE and uv
installs without compiling, so each process would compile litellm anew (~5 s of CPU each, ten
processes): they share compiled files here instead, outside the source tree."""


def toml(config: Mapping[str, Any]) -> str:
    """A tiny TOML writer for these configs: tables of scalars, nested tables, arrays of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(v)

    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any], header: str) -> None:
        lines.append(header)
        for k, v in body.items():
            if not isinstance(v, (dict, list)):
                lines.append(f"{k} = {value(v)}")
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v, f"[{name}.{k}]")
            elif isinstance(v, list):
                for item in v:
                    table(f"{name}.{k}", item, f"[[{name}.{k}]]")

    for name, body in config.items():
        table(name, body, f"[{name}]")
    return "\n".join(lines) + "\n"


def deployment(name: str, model: str, url: str, *, upstream: str | None = None, timeout_s: float = 2.0) -> dict[str, Any]:
    """A ``[[litellm.deployments]]`` entry for the local server (key from ``KSI_REL_KEY``)."""
    return {"name": name, "model": model, "litellm_model": f"openai/{upstream or model}", "api_base": url,
            "api_key_env": KEY_ENV, "timeout_s": timeout_s}


def write_config(path: Path, *deployments: dict[str, Any], retry: Mapping[str, Any] | None = None,
                 circuit: Mapping[str, Any] | None = None, host: Mapping[str, Any] | None = None,
                 queue: Mapping[str, Any] | None = None) -> Path:
    config: dict[str, Any] = {}
    if host:
        config["host"] = dict(host)
    if queue:
        config["queue"] = dict(queue)
    config["retry"] = {"base_delay_s": 0.05, "max_delay_s": 0.5, "max_attempts": 50, "seed": 1, **(retry or {})}
    config["litellm"] = {"circuit": {"failures_to_open": 5, "cooldown_s": 0.3, **(circuit or {})},
                         "deployments": list(deployments)}
    path.write_text(toml(config))
    return path


def write_requests(path: Path, requests: Iterable[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def session_requests(n: int, sessions: int, model: str, prefix: str = "r") -> list[dict[str, Any]]:
    """``n`` requests spread round-robin over ``sessions`` sessions; each prompt is unique and
    says ``<session> <place in session> <request id>`` (how arrivals are matched to requests)."""
    out = []
    for i in range(n):
        sid, k = f"s{i % sessions:02d}", i // sessions
        rid = f"{prefix}{i:04d}"
        out.append({"request_id": rid, "model": model, "session_id": sid, "prompt": f"{sid} {k} {rid}",
                    "agent_id": f"agent-{i % 3}", "purpose": "reliability"})
    return out


def env(*, plugins: str = PLUGINS, key: str = "sk-rel-test-0000", extra: Mapping[str, str] | None = None,
        site: Path | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE", "KSI_HOST_CONFIG", "KSI_HOST_DB")}
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPYCACHEPREFIX=str(PYCACHE), KSI_HOST_PLUGINS=plugins)
    e[KEY_ENV] = key
    if site is not None:
        e["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), e.get("PYTHONPATH", "")) if p)
    e.update(extra or {})
    return e


def run_args(requests: Path, out: Path, db: Path, config: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "ksi_host.cli", "run", str(requests), "--out", str(out), "--db", str(db),
            "--config", str(config), *more]


def ksi(args: list[str], *, environ: Mapping[str, str], timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dict(environ), timeout=timeout)


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ledger(db: Path) -> list[dict[str, Any]]:
    """The ``token_usage`` rows (ksi-tokens' ledger)."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM token_usage ORDER BY id")]
    finally:
        con.close()


def stored_final(db: Path) -> set[str]:
    """Request ids whose final result ksi-queue has stored (committed)."""
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT request_id FROM ksi_queue_requests WHERE status IN ('ok', 'error', 'cancelled')")}
    finally:
        con.close()


def answered_usage(arrivals: Iterable[Arrival]) -> dict[str, int]:
    """What the server reported: the usage summed over its OK answers (``calls``: how many).

    A ``hang`` call is answered too, after ``hang_s``, long after the client's timeout
    closed the connection: nobody receives that usage, so it does not count here."""
    total = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for a in arrivals:
        if a.fault == "ok" and a.usage is not None:
            total["calls"] += 1
            for k, v in a.usage.items():
                total[k] += v
    return total


def prompt(a: Arrival) -> str:
    """The last user message of an arrival: the request's unique prompt."""
    assert a.body is not None
    return a.body["messages"][-1]["content"]


def request_of(a: Arrival) -> str:
    """The request id an arrival belongs to (the last word of its prompt)."""
    return prompt(a).split()[-1]


def by_request(arrivals: Iterable[Arrival]) -> dict[str, list[Arrival]]:
    out: dict[str, list[Arrival]] = defaultdict(list)
    for a in arrivals:
        out[request_of(a)].append(a)
    return out


def check_session_order(arrivals: list[Arrival]) -> int:
    """From the server's own log: within each session, the calls of a request all arrive after the
    OK answer to the previous request of the session was sent, and never out of place order.
    Returns how many sessions were checked."""
    sessions: dict[str, list[Arrival]] = defaultdict(list)
    for a in sorted(arrivals, key=lambda a: a.t):
        sessions[prompt(a).split()[0]].append(a)
    for sid, seen in sessions.items():
        last_k, answered = -1, 0.0
        for a in seen:
            k = int(prompt(a).split()[1])
            assert k >= last_k, f"session {sid}: place {k} arrived after place {last_k} had started"
            if k > last_k:
                assert a.t >= answered, (
                    f"session {sid}: place {k} arrived at {a.t:.4f}, before the OK answer to place {last_k} "
                    f"was sent ({answered:.4f})")
                last_k = k
            if a.fault == "ok" and a.answered_at is not None:
                answered = a.answered_at
    return len(sessions)


def fake_dist(where: Path, module: str, source: str, entry_points: Mapping[str, str], dist: str = "ksi-rel-faulty") -> Path:
    """A module plus a ``*.dist-info`` with ``ksi_host`` entry points: a plugin installed by PYTHONPATH."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{module}.py").write_text(textwrap.dedent(source))
    info = where / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ksi_host]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    return where
