"""One call through the openai provider against the local OpenAI-compatible server: success, usage, each fault."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ksi_provider_openai.client import HttpClient
from ksi_provider_openai.config import OpenAIConfig, OpenAIDeployment
from ksi_provider_openai.plugin import build_pool
from openai_helpers import request

from ksi_host import (
    ProviderUnavailable,
)
from ksi_host.testing.server import OpenAIServer


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
