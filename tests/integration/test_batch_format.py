"""An OpenAI Batch file through ``ksi-host run`` unchanged, against the local OpenAI-compatible server (the
openai provider plugin, the queue, retry and tokens): every output line has the Batch output shape and
a body OpenAI's own client library reads as a chat.completion; a rerun sends nothing again and writes
the same lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from ksi_it import ROOT, results
from openai.types.chat import ChatCompletion


@pytest.fixture
def server():
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0"], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    info = json.loads(p.stdout.readline())
    base = info["url"].rsplit("/v1", 1)[0]
    control = urllib.request.Request(f"{base}/_ksi/faults", method="POST", data=json.dumps(
        {"faults_by_model": {"local-bad": "400", "local-long": "context_length"}}).encode())
    urllib.request.urlopen(control).close()
    info["stats"] = f"{base}/_ksi/stats"
    yield info
    p.terminate()
    p.wait(10)


def hits(server) -> int:
    with urllib.request.urlopen(server["stats"]) as r:
        return json.loads(r.read())["hits"]


def batch_line(custom_id, model, text, **ksi):
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "system", "content": "You are terse."},
                                                  {"role": "user", "content": text}], "max_tokens": 50}}
    if ksi:
        line["ksi"] = ksi
    return json.dumps(line)


def test_a_batch_file_runs_unchanged_and_resumes_without_resending(tmp_path, server):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[openai.deployments]]\nname = "local"\nmodel = "local-*"\napi_base = "{server["url"]}"\n'
                   'api_key_env = "LOCAL_KEY"\ninput_cost_per_mtok = 1.0\noutput_cost_per_mtok = 2.0\n')
    lines = [batch_line(f"request-{i}", "local-a", f"question {i}", **({"session_id": f"s{i % 3}"} if i % 2 else {}))
             for i in range(30)]
    lines += [batch_line("refused", "local-bad", "x"), batch_line("too-long", "local-long", "x"),
              json.dumps({**json.loads(batch_line("streamed", "local-a", "x")),
                          "body": {"model": "local-a", "messages": [{"role": "user", "content": "x"}], "stream": True}}),
              json.dumps({"model": "local-a", "prompt": "a KSI line"})]
    reqs = tmp_path / "batch.jsonl"
    reqs.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LOCAL_KEY="sk-test", KSI_HOST_PLUGINS="queue,openai,retry,tokens")
    run = [sys.executable, "-m", "ksi_host.cli", "run", str(reqs), "--db", str(tmp_path / "k.db"), "--config", str(cfg)]

    first = subprocess.run([*run, "--out", str(tmp_path / "out.jsonl")], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1, first.stderr  # four lines fail
    assert "30 ok, 4 failed" in first.stderr
    out = results(tmp_path / "out.jsonl")
    assert len(out) == 34 and len({o["id"] for o in out}) == 34
    assert all(set(o) == {"id", "custom_id", "response", "error"} and o["id"].startswith("batch_req_") for o in out)
    by_id = {o["custom_id"]: o for o in out}
    assert set(by_id) == {f"request-{i}" for i in range(30)} | {"refused", "too-long", "streamed", None}

    for i in range(30):
        o = by_id[f"request-{i}"]
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["response"]["request_id"] == f"request-{i}"
        completion = ChatCompletion.model_validate(o["response"]["body"])  # OpenAI's client reads it
        assert completion.object == "chat.completion" and completion.model == "local-a"
        assert completion.choices[0].message.content == f"echo: question {i}"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens > 0

    refused = by_id["refused"]  # the upstream's 400: OpenAI's status and error body, and the error
    assert refused["response"]["status_code"] == 400 and refused["error"]["code"] == "invalid_request"
    assert set(refused["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    too_long = by_id["too-long"]
    assert too_long["response"]["status_code"] == 400 and too_long["error"]["code"] == "context_length_exceeded"
    streamed = by_id["streamed"]
    assert streamed["error"]["param"] == "body.stream" and streamed["error"]["line"] == 33
    assert by_id[None]["error"]["param"] == "format" and by_id[None]["error"]["line"] == 34
    assert hits(server) == 32  # the 30, and the two the upstream refused (not retried); the bad lines reached nobody

    again = subprocess.run([*run, "--out", str(tmp_path / "again.jsonl")], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 1, again.stderr
    assert hits(server) == 32  # nothing sent twice
    assert sorted(map(json.dumps, results(tmp_path / "again.jsonl"))) == sorted(map(json.dumps, out))  # the same lines

    usage = subprocess.run([sys.executable, "-m", "ksi_host.cli", "usage", "--db", str(tmp_path / "k.db"), "--json"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert sum(r["calls"] for r in json.loads(usage.stdout)) == 32


def local_runner(tmp_path, server):
    """``run(input name, output name)``: ``ksi-host run`` of a file in ``tmp_path`` against the local server (the openai
    provider, models ``local-*``), on one database; its results by custom_id (or request_id)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[openai.deployments]]\nname = "local"\nmodel = "local-*"\napi_base = "{server["url"]}"\n'
                   'api_key_env = "LOCAL_KEY"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LOCAL_KEY="sk-test", KSI_HOST_PLUGINS="queue,openai,retry,tokens")

    def run(name: str, out: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "ksi_host.cli", "run", str(tmp_path / name), "--db",
                               str(tmp_path / "k.db"), "--config", str(cfg), "--out", str(tmp_path / out)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return {o.get("custom_id") or o.get("request_id"): o for o in results(tmp_path / out)}

    return run


def test_log_probabilities_reach_the_batch_output_and_the_ksi_result_lines_also_on_a_rerun(tmp_path, server):
    from ksi_host.testing.server import logprob_entries

    asked = json.loads(batch_line("asked", "local-a", "one two"))
    asked["body"].update(logprobs=True, top_logprobs=3)
    (tmp_path / "batch.jsonl").write_text(f"{json.dumps(asked)}\n{batch_line('plain', 'local-a', 'one two')}\n")
    (tmp_path / "ksi.jsonl").write_text(
        json.dumps({"model": "local-a", "prompt": "three", "request_id": "k-asked", "logprobs": True}) + "\n"
        + json.dumps({"model": "local-a", "prompt": "three", "request_id": "k-plain"}) + "\n")
    run = local_runner(tmp_path, server)

    for attempt in ("first", "rerun"):
        batch, ksi = run("batch.jsonl", f"batch-{attempt}.jsonl"), run("ksi.jsonl", f"ksi-{attempt}.jsonl")
        choice = ChatCompletion.model_validate(batch["asked"]["response"]["body"]).choices[0]  # OpenAI's client reads it
        assert [t.token for t in choice.logprobs.content] == ["echo: ", "one ", "two"], attempt
        assert batch["asked"]["response"]["body"]["choices"][0]["logprobs"] == {
            "content": logprob_entries("echo: one two", 3), "refusal": None}
        assert batch["plain"]["response"]["body"]["choices"][0]["logprobs"] is None
        assert ksi["k-asked"]["logprobs"] == {"content": logprob_entries("echo: three", 0), "refusal": None}
        assert "logprobs" not in ksi["k-plain"]  # only when set
    assert hits(server) == 4  # the rerun was answered from the store


def test_the_upstreams_system_fingerprint_reaches_the_batch_output_and_the_ksi_result_lines_also_on_a_rerun(
        tmp_path, server):
    from ksi_host.testing.server import SYSTEM_FINGERPRINT

    said = json.loads(batch_line("said", "local-a", "one two"))
    said["body"]["seed"] = 7
    (tmp_path / "said.jsonl").write_text(json.dumps(said) + "\n")  # a file is in one format: OpenAI Batch or KSI
    (tmp_path / "k-said.jsonl").write_text(json.dumps({"model": "local-a", "prompt": "three", "request_id": "k-said",
                                                       "seed": 7}) + "\n")
    (tmp_path / "plain.jsonl").write_text(batch_line("plain", "local-a", "one two") + "\n")
    (tmp_path / "k-plain.jsonl").write_text(json.dumps({"model": "local-a", "prompt": "three", "request_id": "k-plain"}) + "\n")
    run = local_runner(tmp_path, server)

    first = {**run("said.jsonl", "said-1.jsonl"), **run("k-said.jsonl", "k-said-1.jsonl")}
    base = server["url"].rsplit("/v1", 1)[0]  # from now on the upstream says none
    urllib.request.urlopen(urllib.request.Request(f"{base}/_ksi/faults", method="POST",
                                                  data=json.dumps({"system_fingerprint": None}).encode())).close()
    rerun = {**run("said.jsonl", "said-2.jsonl"), **run("k-said.jsonl", "k-said-2.jsonl")}
    plain = {**run("plain.jsonl", "plain-out.jsonl"), **run("k-plain.jsonl", "k-plain-out.jsonl")}
    for lines in (first, rerun):  # the rerun is answered from the store: the fingerprint of the answer it stored
        body = lines["said"]["response"]["body"]
        assert ChatCompletion.model_validate(body).system_fingerprint == SYSTEM_FINGERPRINT  # OpenAI's client reads it
        assert lines["k-said"]["system_fingerprint"] == SYSTEM_FINGERPRINT
    assert plain["plain"]["response"]["body"]["system_fingerprint"] is None
    assert "system_fingerprint" not in plain["k-plain"]  # only when set
    assert hits(server) == 4  # the rerun sent nothing
