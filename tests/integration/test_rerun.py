"""A finished batch run again without its --config: the stored results, not "no provider serves model"."""

import json
import os
import subprocess
import sys

import pytest
from ksi_it import ROOT, results


@pytest.fixture
def server():
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0"], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    info = json.loads(p.stdout.readline())
    yield info
    p.terminate()
    p.wait(10)


def hits(url):
    import urllib.request

    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/_ksi/stats") as r:
        return json.loads(r.read())["hits"]


def test_rerun_without_config_answers_from_the_store(tmp_path, server):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[litellm.deployments]]\nname = "local"\nmodel = "local-*"\nlitellm_model = "openai/local"\n'
                   f'api_base = "{server["url"]}"\napi_key_env = "LOCAL_KEY"\n')
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("".join(json.dumps({"model": "local-a", "prompt": f"q{i}", "session_id": f"s{i % 3}"}) + "\n"
                            for i in range(50)))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LOCAL_KEY": "sk-test", "KSI_HOST_PLUGINS": "queue,litellm,retry,tokens"}
    env.pop("KSI_HOST_CONFIG", None)
    run = [sys.executable, "-m", "ksi_host.cli", "run", str(reqs), "--db", str(tmp_path / "k.db")]
    first = subprocess.run([*run, "--out", str(tmp_path / "first.jsonl"), "--config", str(cfg)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert hits(server["url"]) == 50
    again = subprocess.run([*run, "--out", str(tmp_path / "again.jsonl")], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # local-* is served by nothing now: the stored results answer
    assert sorted(map(json.dumps, results(tmp_path / "again.jsonl"))) == sorted(map(json.dumps, results(tmp_path / "first.jsonl")))
    assert hits(server["url"]) == 50
    # a line whose result is not stored still fails, naming its line
    reqs.write_text(reqs.read_text() + json.dumps({"model": "local-a", "prompt": "new"}) + "\n")
    third = subprocess.run([*run, "--out", str(tmp_path / "third.jsonl")], env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 1, third.stderr
    errors = [r["error"] for r in results(tmp_path / "third.jsonl") if r["status"] != "ok"]
    assert len(errors) == 1 and errors[0]["type"] == "ValidationError"
    assert errors[0]["message"].startswith("line 51: model: no provider serves model 'local-a'")
