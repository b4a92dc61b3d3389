"""6. Secrets: a real-looking key in the environment, debug logging on.

One run with both ``-vv`` (every logger at DEBUG with a stderr handler:
litellm's, httpx's and the OpenAI SDK's included) and ``[host] log_level =
"DEBUG"`` (the ``ksi_host`` loggers at DEBUG): the most logging there is. (With
``log_level`` alone nothing below WARNING is printed: no handler, so that run
could only show less.) The results go to stdout, which must hold nothing but
them. The server
answers some calls 429, 500 and 401, and its 401 repeats the key it was sent
(as some upstreams do). Checked: the key reached the server's Authorization
header on every call; no 12-character piece of it appears in the database,
its WAL (read while the run writes it, and whatever is left after) and shared
memory file, the results file, stdout or stderr, nor in any other file the
run left in its folder.
"""

from __future__ import annotations

import secrets
import string
import subprocess
import time
from pathlib import Path
from typing import Any

from rel import KEY_ENV, deployment, env, results, run_args, session_requests, write_config, write_requests


def leaked(blob: bytes, key: str) -> str | None:
    """The first 12-character piece of ``key`` found in ``blob`` (masking that keeps 12 characters is a leak too)."""
    for i in range(len(key) - 11):
        piece = key[i:i + 12]
        if piece.encode() in blob:
            return piece
    return None


def test_the_key_reaches_the_server_and_nothing_else(tmp_path: Path, server: Any) -> None:
    key = "sk-proj-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(48))
    server.echo_auth = True
    server.script("401", "429", "500", "401")
    server.set_faults(rates={"429": 0.1, "500": 0.1})
    reqs = session_requests(24, 4, "sec-model")
    requests = write_requests(tmp_path / "requests.jsonl", reqs)
    config = write_config(tmp_path / "ksi.toml", deployment("main", "sec-model", server.url),
                          deployment("backup", "sec-model", server.url),
                          host={"log_level": "DEBUG"})
    db = tmp_path / "ksi.db"
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    out = stdout_path  # the results go to stdout (the default): debug logging must not get into them
    args = run_args(requests, Path("-"), db, config, "-vv")
    with stdout_path.open("wb") as so, stderr_path.open("wb") as se:
        p = subprocess.Popen(args, env=env(key=key), stdout=so, stderr=se)
    wal = Path(f"{db}-wal")
    snapshots = 0
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:  # the WAL while the run writes it
        if wal.exists():
            found = leaked(wal.read_bytes(), key)
            assert found is None, f"a piece of the key is in the WAL: {found}"
            snapshots += 1
        time.sleep(0.05)
    p.wait(30)
    stdout, stderr = stdout_path.read_bytes(), stderr_path.read_bytes()
    assert p.returncode in (0, 1), stderr.decode()[-3000:]
    assert snapshots > 0

    assert server.hits >= len(reqs)
    assert {a.authorization for a in server.arrivals} == {f"Bearer {key}"}
    assert server.counts["401"] == 2
    final = results(out)  # every line of stdout is a result
    assert len(final) == len(reqs) and sum(r["status"] == "ok" for r in final) >= len(reqs) - 2
    assert b"ksi_host.provider.litellm DEBUG" in stderr and b"LiteLLM DEBUG" in stderr  # the debug logs were on
    for name, blob in (("stdout", stdout), ("stderr", stderr)):
        assert leaked(blob, key) is None, f"a piece of the key is in {name}"
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert db in files and out in files
    for f in files:
        assert leaked(f.read_bytes(), key) is None, f"a piece of the key is in {f.name}"
    assert KEY_ENV.encode() in (tmp_path / "ksi.toml").read_bytes()  # the config names the variable only
