"""``ksi-host serve`` killed and stopped under load: every accepted request finishes, none is sent twice once
answered, and a client's retry with the same ``Idempotency-Key`` gets the stored answer."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from ksi_serve.testing import ServeProcess, toml

from ksi_host.testing.server import OpenAIServer

PLUGINS = "queue,openai,retry,tokens,serve"


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_HOST_")}
    env.update(KSI_HOST_PLUGINS=PLUGINS, LITELLM_LOCAL_MODEL_COST_MAP="True", OTEL_TRACES_EXPORTER="none")
    return env


@pytest.fixture
def upstream() -> Iterator[OpenAIServer]:
    server = OpenAIServer(delay_s=0.3, keep_bodies=True).start_in_thread()
    try:
        yield server
    finally:
        server.stop_thread()


def config(path: Path, upstream: OpenAIServer, concurrency: int) -> Path:
    path.write_text(toml({
        "queue": {"concurrency": concurrency},
        "retry": {"base_delay_s": 0.05, "max_delay_s": 0.5, "max_attempts": 5, "seed": 1},
        "openai": {"deployments": [{"name": "local", "model": "gpt-*", "api_base": upstream.url, "timeout_s": 10.0}]},
    }))
    return path


def rows(db: Path) -> dict[str, str]:
    """request id -> status, as the queue stored them."""
    con = sqlite3.connect(db, timeout=10)
    try:
        return dict(con.execute("SELECT request_id, status FROM ksi_queue_requests"))
    finally:
        con.close()


def prompt_of(rid: str) -> str:
    return f"please answer {rid}"


async def send_all(url: str, keys: list[str], *, sessions: int) -> dict[str, Any]:
    """Send one request per key at once (no retries); key -> the answer's text, or the exception raised."""
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
        async def one(i: int, key: str) -> Any:
            try:
                answer = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": prompt_of(key)}],
                    extra_headers={"Idempotency-Key": key, "X-KSI-Session-Id": f"s{i % sessions}"})
                return answer.choices[0].message.content
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                return e

        results = await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
    return dict(zip(keys, results, strict=True))


def wait_until_final(db: Path, ids: set[str], timeout_s: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        stored = rows(db)
        if all(stored.get(i) in ("ok", "error", "cancelled") for i in ids) or time.monotonic() > deadline:
            return stored
        time.sleep(0.1)


def test_sigkill_mid_load_then_a_restart_finishes_every_accepted_request(tmp_path: Path, upstream: OpenAIServer):
    db, cfg = tmp_path / "ksi.db", config(tmp_path / "ksi.toml", upstream, concurrency=4)
    keys = [f"k{i:03d}" for i in range(40)]
    first = ServeProcess(cfg, db, env=environment()).start()

    async def load_then_kill() -> dict[str, Any]:
        sending = asyncio.ensure_future(send_all(first.url, keys, sessions=8))
        while upstream.hits < 10:  # some answered, some running, the rest queued in their sessions
            await asyncio.sleep(0.02)
        first.kill()
        return await sending

    before = asyncio.run(load_then_kill())
    assert first.returncode == -signal.SIGKILL
    answered = {k for k, v in before.items() if isinstance(v, str)}
    accepted = set(rows(db))  # stored before the kill: the queue commits a request before it answers
    assert answered and answered <= accepted and len(accepted) > len(answered)
    unfinished = {k for k, status in rows(db).items() if status in ("queued", "running")}
    assert unfinished, "the kill came after everything had finished"

    with ServeProcess(cfg, db, env=environment()) as second:
        stored = wait_until_final(db, accepted)  # the restart runs them without any client asking
        assert {k: stored[k] for k in accepted} == dict.fromkeys(accepted, "ok")
        hits = upstream.hits
        after = asyncio.run(send_all(second.url, sorted(accepted), sessions=8))  # the clients retry, same keys
        assert after == {k: f"echo: {prompt_of(k)}" for k in sorted(accepted)}
        assert upstream.hits == hits  # every retry was answered from the store
    assert second.returncode == 0, second.log()
    sent = Counter(a.body["messages"][-1]["content"].split()[-1] for a in upstream.arrivals)
    assert set(sent) == accepted
    assert all(sent[k] == 1 for k in answered)  # what was answered before the kill was never sent again


def test_sigterm_drains_running_requests_and_keeps_queued_ones(tmp_path: Path, upstream: OpenAIServer):
    upstream.delay_s = 1.0
    db, cfg = tmp_path / "ksi.db", config(tmp_path / "ksi.toml", upstream, concurrency=2)
    keys = [f"d{i}" for i in range(6)]
    first = ServeProcess(cfg, db, env=environment()).start()

    async def load_then_stop() -> tuple[dict[str, Any], float]:
        sending = asyncio.ensure_future(send_all(first.url, keys, sessions=6))
        while upstream.hits < 2:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        os.kill(first.pid, signal.SIGTERM)
        results = await sending
        return results, time.monotonic() - started

    results, took = asyncio.run(load_then_stop())
    assert first.wait() == 0, first.log()
    running = {a.body["messages"][-1]["content"].split()[-1] for a in upstream.arrivals}
    assert len(running) == 2 and took < 5
    assert {k for k, v in results.items() if isinstance(v, str)} == running  # the running ones finished, answered
    for k in set(keys) - running:  # the queued ones: 503, retry with the same key
        error = results[k]
        assert isinstance(error, openai.APIStatusError) and error.status_code == 503, (k, error)
        assert error.body["code"] == "server_stopping" and error.response.headers["Retry-After"]
    stored = rows(db)
    assert {k for k, s in stored.items() if s == "ok"} == running
    assert {k for k, s in stored.items() if s == "queued"} == set(keys) - running
    assert "stopping: no new requests" in first.log() and "stopped" in first.log()

    upstream.delay_s = 0.01
    with ServeProcess(cfg, db, env=environment()) as second:
        again = asyncio.run(send_all(second.url, keys, sessions=6))
    assert again == {k: f"echo: {prompt_of(k)}" for k in keys}
    assert upstream.hits == 6  # each sent once, across the stop


def _stream_in_thread(url: str, key: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A streamed call in a thread: ``got["text"]`` once it ended cleanly, ``got["error"]`` when it failed."""
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
            stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt_of(key)}],
                                                    stream=True, extra_headers={"Idempotency-Key": key})
            got["text"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # reported to the test
            got["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def _until(condition: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_sigterm_lets_an_open_stream_finish_answers_503_on_open_connections_and_ignores_idle_ones(tmp_path: Path):
    upstream = OpenAIServer(script=["hold"]).start_in_thread()  # the stream's last chunk waits for release()
    try:
        db, cfg = tmp_path / "ksi.db", config(tmp_path / "ksi.toml", upstream, concurrency=2)
        served = ServeProcess(cfg, db, env=environment()).start()
        host, port = served.base.removeprefix("http://").rsplit(":", 1)
        idle = http.client.HTTPConnection(host, int(port), timeout=10)  # a keep-alive connection, left open
        idle.request("GET", "/healthz")
        first = idle.getresponse()
        assert (first.status, json.loads(first.read())["status"]) == (200, "ok")
        thread, got = _stream_in_thread(served.url, "s1")
        _until(lambda: upstream.holding == 1)
        started = time.monotonic()
        os.kill(served.pid, signal.SIGTERM)
        _until(lambda: "stopping: no new requests" in served.log())
        idle.request("GET", "/healthz")  # the open connection still answers: 503 while the server drains
        response = idle.getresponse()
        assert (response.status, json.loads(response.read())["status"]) == (503, "stopping")
        with pytest.raises(ConnectionRefusedError):  # no new connections
            socket.create_connection((host, int(port)), timeout=5).close()
        upstream.release()
        thread.join(20)
        assert got == {"text": f"echo: {prompt_of('s1')}"}  # the open stream finished, [DONE] included
        assert served.wait(20) == 0, served.log()
        assert time.monotonic() - started < 10  # the idle keep-alive connection did not hold the stop open
        assert served.log().rstrip().endswith("ksi-host serve: stopped")
        idle.close()
    finally:
        upstream.stop_thread()


def test_a_second_signal_stops_at_once_with_exit_130(tmp_path: Path):
    upstream = OpenAIServer(script=["hold"]).start_in_thread()
    try:
        db, cfg = tmp_path / "ksi.db", config(tmp_path / "ksi.toml", upstream, concurrency=2)
        served = ServeProcess(cfg, db, env=environment()).start()
        thread, got = _stream_in_thread(served.url, "s2")
        _until(lambda: upstream.holding == 1)
        os.kill(served.pid, signal.SIGTERM)
        _until(lambda: "stopping: no new requests" in served.log())
        started = time.monotonic()
        os.kill(served.pid, signal.SIGINT)
        assert served.wait(20) == 130, served.log()
        assert time.monotonic() - started < 5
        thread.join(20)
        assert isinstance(got.get("error"), openai.APIError)  # its stream was cut (no [DONE])
        log = served.log()
        assert "stopping now: the requests still running stay stored" in log and "Traceback" not in log
        assert rows(db) == {"s2": "running"}  # stored unfinished: it runs again at the next start
    finally:
        upstream.stop_thread()
