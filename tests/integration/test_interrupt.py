"""Ctrl-C (or SIGTERM) during `ksi-host run`: exit 130, unfinished work stored; the rerun completes the batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from ksi_it import ROOT, results


@pytest.fixture
def server():
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0", "--delay", "0.2"],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    info = json.loads(p.stdout.readline())
    yield info
    p.terminate()
    p.wait(10)


def stats(url):
    import urllib.request

    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/_ksi/stats") as r:
        return json.loads(r.read())


def _setup(tmp_path, server, n=60):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'''
[[litellm.deployments]]
name = "local"
model = "local-*"
litellm_model = "openai/local"
api_base = "{server['url']}"
api_key_env = "LOCAL_KEY"
timeout_s = 10
''')
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("".join(json.dumps({"model": "local-a", "prompt": f"q{i}", "session_id": f"s{i % 5}",
                                        "request_id": f"r{i:03d}"}) + "\n" for i in range(n)))
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LOCAL_KEY": "sk-test", "KSI_HOST_PLUGINS": "queue,litellm,retry,tokens"}
    args = [sys.executable, "-m", "ksi_host.cli", "run", str(reqs), "--out", str(out), "--db", str(tmp_path / "k.db"),
            "--config", str(cfg), "--concurrency", "4"]
    return args, env, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_sigint_stops_then_rerun_completes_with_one_upstream_call_per_request(tmp_path, server, sig):
    args, env, out = _setup(tmp_path, server)
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 10):
        time.sleep(0.05)
    p.send_signal(sig)  # SIGTERM (kill, a service manager) stops as Ctrl-C does
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Interrupted" in err and "run again to resume" in err and "Traceback" not in err
    first = results(out)
    assert 10 <= len(first) < 60 and all(r["status"] == "ok" for r in first)
    # the requests running at the Ctrl-C finished and were written; none other reached the upstream
    assert stats(server["url"])["hits"] == len(first)

    p2 = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert p2.returncode == 0, p2.stderr
    final = results(out)
    assert sorted(r["request_id"] for r in final) == [f"r{i:03d}" for i in range(60)]  # exactly one result each
    assert all(r["status"] == "ok" for r in final)
    assert stats(server["url"])["hits"] == 60  # one upstream call per request, across the interruption
    # each session kept its order across the interruption
    by_session = {}
    for r in sorted(final, key=lambda r: r["started_at"]):
        by_session.setdefault(r["session_id"], []).append(r["request_id"])
    for ids in by_session.values():
        assert ids == sorted(ids)


@pytest.fixture
def slow_server():
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0", "--delay", "30"],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    info = json.loads(p.stdout.readline())
    yield info
    p.terminate()
    p.wait(10)


def test_a_second_sigint_stops_at_once(tmp_path, slow_server):
    """Upstream calls that take 30 s: the first Ctrl-C waits for them, the second does not."""
    args, env, out = _setup(tmp_path, slow_server, n=8)
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and stats(slow_server["url"])["hits"] < 4:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert p.poll() is None  # still waiting for the four running requests
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130, err
    assert time.monotonic() - t0 < 10 and "Traceback" not in err and "Interrupted: 0 of 8 requests" in err
    assert results(out) == []
