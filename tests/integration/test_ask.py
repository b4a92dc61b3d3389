"""``ksi-host ask`` with the real plugins: offline against mock/ right after the README's install; Ctrl-C with
the real queue stores the request cancelled (it never runs again); the unfinished requests an interrupted
``ksi-host run`` left in the database are held, not sent, and the run finishes them afterwards."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from ksi_it import ROOT, cli, results

STREAMING_PROVIDER = '''
import asyncio
import os
from pathlib import Path

from ksi_host import ProviderResponse, Usage, hookimpl
from ksi_host.testing import FakeProvider, FakeStreamingProvider, ScriptedProviders

DIR = Path(os.environ["KSI_ASK_TEST_DIR"])


def log(line):
    with open(DIR / "events.log", "a") as f:
        f.write(line + "\\n")


class Hold:
    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        log("holding")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log("closed")
            raise


class Streamer(FakeStreamingProvider):
    async def stream(self, request, *, timeout_s):
        log(f"stream {request.request_id}")
        async for piece in super().stream(request, timeout_s=timeout_s):
            yield piece


class Providers(ScriptedProviders):
    def __init__(self):
        super().__init__(Streamer("streamer", "stream/*", script=[["one ", "two ", Hold(), "three"]]),
                         FakeProvider("echo", "echo/*"))
'''


def _dist(site: Path) -> Path:
    site.mkdir(parents=True)
    (site / "ksi_ask_stream.py").write_text(textwrap.dedent(STREAMING_PROVIDER))
    info = site / "ksi_ask_stream-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ksi-ask-stream\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ksi_host]\naskstream = ksi_ask_stream:Providers\n")
    return site


def test_ask_answers_offline_with_the_four_plugins_and_the_ledger_has_the_call(db):
    p = cli("ask", "hello", "--model", "mock/gpt-4o-mini", "--db", str(db), "--agent", "me")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "mock response to: hello\n"
    assert p.stderr.startswith("ksi-host: ok: ") and "provider mock" in p.stderr and "cost $" in p.stderr
    u = cli("usage", "--db", str(db), "--by", "agent", "--json")
    assert [(r["key"], r["calls"]) for r in json.loads(u.stdout)] == [("me", 1)]


def test_ctrl_c_stores_the_request_cancelled_and_it_never_runs_again(tmp_path, db):
    site = _dist(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", KSI_HOST_PLUGINS="queue,retry,tokens,askstream",
               KSI_ASK_TEST_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.cli", "ask", "count", "--model", "stream/x", "--db", str(db)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "events.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and "holding" in log.read_text()):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "timed out"
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert out == "one two \n" and err.strip().splitlines()[-1].startswith("ksi-host: cancelled: ")
    rows = sqlite3.connect(db).execute("SELECT status, result_text FROM ksi_queue_requests").fetchall()
    assert rows == [("cancelled", "one two ")]  # stored final, with what was handed out

    # a host that serves the database again does not run it
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"model": "echo/x", "prompt": "hi"}) + "\n")
    again = subprocess.run([sys.executable, "-m", "ksi_host.cli", "run", str(batch), "--db", str(db)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    events = log.read_text().splitlines()
    assert [e for e in events if e.startswith("stream ")] == [events[0]] and "closed" in events


@pytest.fixture
def server():
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0", "--delay", "0.2"],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    info = json.loads(p.stdout.readline())
    yield info
    p.terminate()
    p.wait(10)


def hits(url: str) -> int:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/_ksi/stats") as r:
        return json.loads(r.read())["hits"]


def test_an_interrupted_runs_requests_are_held_not_sent_and_the_run_finishes_them(tmp_path, server):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[litellm.deployments]]\nname = "local"\nmodel = "local-*"\nlitellm_model = "openai/local"\n'
                   f'api_base = "{server["url"]}"\napi_key_env = "LOCAL_KEY"\n')
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("".join(json.dumps({"model": "local-a", "prompt": f"q{i}", "session_id": f"s{i % 5}",
                                        "request_id": f"r{i:03d}"}) + "\n" for i in range(60)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LOCAL_KEY="sk-test", KSI_HOST_PLUGINS="queue,litellm,retry,tokens")
    common = ["--db", str(tmp_path / "k.db"), "--config", str(cfg)]
    run = [sys.executable, "-m", "ksi_host.cli", "run", str(reqs), "--out", str(tmp_path / "out.jsonl"), *common]
    p = subprocess.Popen([*run, "--concurrency", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 8):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    done = len(results(out))
    assert hits(server["url"]) == done < 60

    ask = [sys.executable, "-m", "ksi_host.cli", "ask", "a question", "--model", "local-a", *common]
    a = subprocess.run(ask, env=env, capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    assert a.stdout == "echo: a question\n"
    assert hits(server["url"]) == done + 1  # its own request only
    assert "ksi-host: note: unfinished requests of an earlier run in" in a.stderr and "left for ksi-host run" in a.stderr

    # a question in a session whose earlier requests wait: it cannot start before them, and ask does not start them
    t0 = time.monotonic()
    a = subprocess.run([*ask, "--session", "s1"], env=env, capture_output=True, text=True, timeout=120)
    assert a.returncode == 2, a.stderr
    assert "cannot start:" in a.stderr and "holds unfinished requests of an earlier run" in a.stderr
    assert "finish them with ksi-host run" in a.stderr
    assert time.monotonic() - t0 < 60 and hits(server["url"]) == done + 1

    p2 = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert p2.returncode == 0, p2.stderr
    assert sorted(r["request_id"] for r in results(out)) == [f"r{i:03d}" for i in range(60)]
    assert hits(server["url"]) == 60 + 1  # each of the batch once, the first question once; the second never
