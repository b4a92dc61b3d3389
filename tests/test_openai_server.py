"""ksi_host.testing.server: the local OpenAI-compatible test server (stdlib client only)."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ksi_host.testing.server import OpenAIServer


def post(conn: http.client.HTTPConnection, model: str = "m", path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None, **extra: Any) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "say hi now"}], **extra})
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def connect(server: OpenAIServer, timeout: float = 5) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.host, server.port, timeout=timeout)


def test_ok_answer_is_openai_shaped_with_usage(openai_server: OpenAIServer) -> None:
    assert openai_server.url == f"http://127.0.0.1:{openai_server.port}/v1"
    status, headers, raw = post(connect(openai_server), "gpt-x", headers={"Authorization": "Bearer k1", "X-Session-Id": "s1"},
                                user="agent-1", metadata={"purpose": "t"})
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(raw)
    assert data["object"] == "chat.completion" and data["model"] == "gpt-x"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "echo: say hi now"}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    a = openai_server.arrivals[0]
    assert (a.model, a.fault, a.authorization, a.session_id, a.user, a.metadata) == (
        "gpt-x", "ok", "Bearer k1", "s1", "agent-1", {"purpose": "t"})
    assert openai_server.hits == 1 and openai_server.counts == {"ok": 1}


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("429", 429, "rate_limit_exceeded"), ("500", 500, None), ("502", 502, None), ("503", 503, None),
     ("400", 400, None), ("401", 401, "invalid_api_key"), ("403", 403, None),
     ("context_length", 400, "context_length_exceeded")],
)
def test_error_faults(openai_server: OpenAIServer, fault: str, status: int, code: str | None) -> None:
    openai_server.script(fault)
    got, headers, raw = post(connect(openai_server))
    assert got == status
    err = json.loads(raw)["error"]
    assert err["code"] == code and err["message"]
    assert ("retry-after" in headers) == (fault == "429")
    if fault == "429":
        assert headers["retry-after"] == "1"


def test_malformed_disconnect_and_hang(openai_server: OpenAIServer) -> None:
    openai_server.hang_s = 0.3
    openai_server.script("malformed", "disconnect", "hang")
    status, _, raw = post(connect(openai_server))
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        post(connect(openai_server))
    with pytest.raises(TimeoutError):
        post(connect(openai_server, timeout=0.1))
    assert openai_server.counts == {"malformed": 1, "disconnect": 1, "hang": 1}


def test_keep_alive_and_both_paths(openai_server: OpenAIServer) -> None:
    conn = connect(openai_server)
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/chat/completions"):
        assert post(conn, path=path)[0] == 200
    assert openai_server.hits == 3
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read() and openai_server.hits == 3


def test_script_then_rates_then_ok_and_model_faults(openai_server: OpenAIServer) -> None:
    openai_server.set_faults(script=["500"], faults_by_model={"bad": "503"})
    conn = connect(openai_server)
    assert [post(conn, "bad")[0], post(conn)[0], post(conn)[0], post(conn, "bad")[0]] == [503, 500, 200, 503]
    with pytest.raises(ValueError, match="unknown fault"):
        openai_server.script("418")
    with pytest.raises(ValueError, match="sum"):
        openai_server.set_faults(rates={"429": 0.7, "500": 0.6})


def test_seeded_rates_are_reproducible_and_close_to_the_rates() -> None:
    def draw(seed: int) -> list[str]:
        s = OpenAIServer(rates={"429": 0.25, "500": 0.2, "hang": 0.03}, seed=seed)
        return [s._choose("m") for _ in range(4000)]

    a, b = draw(7), draw(7)
    assert a == b and a != draw(8)
    assert a.count("429") / 4000 == pytest.approx(0.25, abs=0.03)
    assert a.count("500") / 4000 == pytest.approx(0.20, abs=0.03)
    assert a.count("hang") / 4000 == pytest.approx(0.03, abs=0.01)


def test_concurrent_clients(openai_server: OpenAIServer) -> None:
    openai_server.delay_s = 0.05

    def worker(_: int) -> list[int]:
        conn = connect(openai_server)
        return [post(conn)[0] for _ in range(5)]

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        statuses = [s for batch in pool.map(worker, range(32)) for s in batch]
    assert statuses == [200] * 160 and openai_server.hits == 160
    assert time.monotonic() - t0 < 5 * 0.05 * 8  # answered concurrently, not one at a time


async def test_runs_on_the_current_loop_too() -> None:
    async with OpenAIServer(reply="fixed") as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        data = json.loads(await reader.readexactly(length))
        writer.close()
    assert data["choices"][0]["message"]["content"] == "fixed"


def test_control_endpoints(openai_server: OpenAIServer) -> None:
    conn = connect(openai_server)
    conn.request("POST", "/_ksi/faults", json.dumps({"script": ["429"], "retry_after": "3"}))
    assert conn.getresponse().read()
    status, headers, _ = post(conn)
    assert (status, headers["retry-after"]) == (429, "3")
    conn.request("GET", "/_ksi/stats")
    assert json.loads(conn.getresponse().read()) == {"hits": 1, "counts": {"429": 1}}
    conn.request("GET", "/_ksi/arrivals")
    assert json.loads(conn.getresponse().read())[0]["fault"] == "429"
    conn.request("POST", "/_ksi/faults", json.dumps({"bogus": 1}))
    r = conn.getresponse()
    assert r.status == 400 and b"bogus" in r.read()
    conn.request("POST", "/_ksi/reset", "")
    assert json.loads(conn.getresponse().read()) == {"hits": 0, "counts": {}}


def test_standalone_process_prints_its_port() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0", "--script", "503"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["url"] == f"http://127.0.0.1:{info['port']}/v1"
        conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=5)
        assert post(conn)[0] == 503
        assert post(conn)[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
