"""One call through the openai provider against the local OpenAI-compatible server: success, usage, each fault."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import pytest
from ksi_provider_openai.client import HttpClient
from ksi_provider_openai.config import OpenAIConfig, OpenAIDeployment
from ksi_provider_openai.plugin import build_pool
from openai_helpers import KEY_ENV, SECRET_KEY, request

from ksi_host import (
    AuthFailed,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ksi_host.testing.faults import PROVIDER_FAULTS
from ksi_host.testing.server import OpenAIServer


async def test_success_text_usage_session_and_key(make_provider: Any, openai_server: Any, api_key: str) -> None:
    p = make_provider()
    r = await p.complete(request(text="hello there", session_id="conv-7"), timeout_s=5)
    assert r.text == "echo: hello there"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 3, 8)
    assert r.usage.cost_usd is None  # no price configured
    assert r.session_id == "conv-7"
    assert r.model == "gpt-test"
    assert openai_server.hits == 1
    arrival = openai_server.arrivals[0]
    assert arrival.model == "gpt-test"
    assert arrival.authorization == f"Bearer {SECRET_KEY}"  # read from the variable at call time


async def test_cost_from_configured_prices(make_provider: Any, api_key: str) -> None:
    p = make_provider(input_cost_per_mtok=2.0, output_cost_per_mtok=10.0)
    r = await p.complete(request(), timeout_s=5)
    assert r.usage is not None
    assert r.usage.cost_usd == pytest.approx((5 * 2.0 + 3 * 10.0) / 1e6)


async def test_body_carries_model_messages_and_options(make_provider: Any, openai_server: Any, api_key: str) -> None:
    p = make_provider(model="llama-*", upstream_model="meta/{model}", headers={"X-Title": "ksi"})
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    from ksi_host.models import CompletionRequest

    await p.complete(CompletionRequest(model="llama-3", messages=msgs, max_tokens=7, temperature=0.5), timeout_s=5)
    body = openai_server.arrivals[0].body
    assert body == {"model": "meta/llama-3", "messages": msgs, "max_tokens": 7, "temperature": 0.5}


async def test_fixed_upstream_model_and_no_key_means_no_authorization(make_provider: Any, openai_server: Any) -> None:
    p = make_provider(upstream_model="served-name", api_key_env=None)  # Ollama / vLLM without a key
    r = await p.complete(request(), timeout_s=5)
    assert r.text == "echo: hello there"
    assert openai_server.arrivals[0].model == "served-name"
    assert openai_server.arrivals[0].authorization is None


@pytest.mark.parametrize(("fault", "error", "status"), PROVIDER_FAULTS)
async def test_each_fault_maps_and_makes_exactly_one_upstream_attempt(
    make_provider: Any, openai_server: Any, api_key: str, fault: str, error: type, status: int | None
) -> None:
    p = make_provider()
    openai_server.script(fault, fault)
    with pytest.raises(error) as info:
        await p.complete(request(), timeout_s=5)
    e = info.value
    assert type(e) is error
    assert e.provider == "main"
    assert e.status_code == status
    assert e.message.startswith("main: ")
    assert SECRET_KEY not in e.message
    assert openai_server.hits == 1, f"{fault}: {openai_server.hits} upstream attempts, want exactly 1"
    # the connection pool is still usable after any fault
    openai_server.script()
    openai_server.reset()
    assert (await p.complete(request(), timeout_s=5)).text == "echo: hello there"


async def test_retry_after_seconds_and_http_date(make_provider: Any, openai_server: Any, api_key: str) -> None:
    p = make_provider()
    openai_server.retry_after = "7"
    openai_server.script("429")
    with pytest.raises(RateLimited) as info:
        await p.complete(request(), timeout_s=5)
    assert info.value.retry_after == 7.0
    assert "retry after 7s" in info.value.message
    openai_server.retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)
    openai_server.script("429")
    with pytest.raises(RateLimited) as info:
        await p.complete(request(), timeout_s=5)
    assert info.value.retry_after == pytest.approx(30, abs=2)
    openai_server.retry_after = None
    openai_server.script("429")
    with pytest.raises(RateLimited) as info:
        await p.complete(request(), timeout_s=5)
    assert info.value.retry_after is None


async def test_hang_becomes_provider_timeout_at_the_timeout(make_provider: Any, openai_server: Any, api_key: str) -> None:
    p = make_provider()
    openai_server.script("hang")
    t0 = time.monotonic()
    with pytest.raises(ProviderTimeout) as info:
        await p.complete(request(), timeout_s=0.3)
    elapsed = time.monotonic() - t0
    assert 0.28 <= elapsed < 1.0, elapsed
    assert info.value.provider == "main" and "0.3s" in info.value.message
    assert openai_server.hits == 1


async def test_deployment_timeout_is_used_when_the_host_gives_none(make_provider: Any, openai_server: Any, api_key: str) -> None:
    p = make_provider(timeout_s=0.3)
    openai_server.script("hang")
    t0 = time.monotonic()
    with pytest.raises(ProviderTimeout):
        await p.complete(request(), timeout_s=None)
    assert time.monotonic() - t0 < 1.0


async def test_connection_refused_is_provider_unavailable(client: HttpClient, api_key: str) -> None:
    d = OpenAIDeployment(name="nowhere", model="m", api_base="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    p = build_pool(OpenAIConfig(deployments=[d]), client, clock=time.monotonic).get("nowhere")
    assert p is not None
    with pytest.raises(ProviderUnavailable) as info:
        await p.complete(request(model="m"), timeout_s=3)
    assert info.value.provider == "nowhere" and "connection failed" in info.value.message


async def test_missing_key_variable_is_auth_failed_naming_the_variable(
    make_provider: Any, openai_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    p = make_provider()
    with pytest.raises(AuthFailed) as info:
        await p.complete(request(), timeout_s=5)
    assert KEY_ENV in info.value.message
    assert openai_server.hits == 0  # nothing sent without a key


async def test_error_at_a_success_status_is_mapped(client: HttpClient, api_key: str) -> None:
    async with OpenAIServer(reply="x") as server:
        d = OpenAIDeployment(name="gw", model="m", api_base=server.url)
        p = build_pool(OpenAIConfig(deployments=[d]), client, clock=time.monotonic).get("gw")
        assert p is not None
        with pytest.raises(ProviderUnavailable) as info:
            p._response(b'{"error": {"message": "upstream exploded"}}', 200, request(model="m"))
        assert "upstream exploded" in info.value.message
        for raw in (b"[1, 2]", b'{"choices": []}', b'{"choices": [{"message": {"content": 5}}]}', b"\xff\xfe"):
            with pytest.raises(ProviderUnavailable, match="malformed response"):
                p._response(raw, 200, request(model="m"))
        ok = p._response(b'{"choices": [{"message": {"content": null}}]}', 200, request(model="m"))
        assert ok.text == "" and ok.usage is None


async def test_one_pooled_client_serves_many_concurrent_calls(make_provider: Any, openai_server: Any, api_key: str) -> None:
    p = make_provider()
    openai_server.delay_s = 0.01
    results = await asyncio.gather(*(p.complete(request(text=f"n{i}"), timeout_s=5) for i in range(40)))
    assert sorted(r.text for r in results) == sorted(f"echo: n{i}" for i in range(40))
    session = await p.client.session()
    assert session is await p.client.session()
    assert session.connector.limit == 8  # the fixture's max_connections: 40 calls shared 8 connections
    await p.client.close()
    assert session.closed and not p.client.open
