"""One call through real litellm against the local OpenAI-compatible server: success, usage, each fault."""

from __future__ import annotations

import time
from typing import Any

import pytest
from ksi_provider_litellm.config import LitellmConfig, LitellmDeployment
from ksi_provider_litellm.plugin import build_pool
from ksi_provider_litellm.provider import LitellmProvider, load_litellm
from provider_helpers import KEY_ENV, FakeClock, UsageRecorder, deployment, request

from ksi_host import (
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)


def provider(server: Any, **kw: Any) -> LitellmProvider:
    d = LitellmDeployment(**deployment(server, **kw))
    pool = build_pool(LitellmConfig(deployments=[d]), clock=FakeClock())
    p = pool.get(d.name)
    assert p is not None
    return p


async def test_cost_from_litellms_cost_map_when_it_knows_the_model(openai_server: Any, api_key: str) -> None:
    p = provider(openai_server, model="gpt-4o-mini", upstream="openai/gpt-4o-mini")
    r = await p.complete(request(model="gpt-4o-mini"), timeout_s=5)
    lit = await load_litellm()
    assert r.usage is not None and r.usage.cost_usd is not None
    # gpt-4o-mini: $0.15 / 1M prompt tokens, $0.60 / 1M completion tokens in litellm's local cost map
    info = lit.get_model_info("gpt-4o-mini")
    assert r.usage.cost_usd == pytest.approx(
        5 * info["input_cost_per_token"] + 3 * info["output_cost_per_token"])


async def test_one_attempt_even_when_litellm_global_retries_are_on(
    openai_server: Any, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lit = await load_litellm()
    monkeypatch.setattr(lit, "num_retries", 3)
    p = provider(openai_server)
    for fault in ("429", "500", "503"):
        openai_server.reset()
        openai_server.script(fault, fault, fault, fault)
        with pytest.raises((RateLimited, ProviderUnavailable)):
            await p.complete(request(), timeout_s=5)
        assert openai_server.hits == 1, fault


async def test_key_is_read_at_call_time(openai_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-first-key-000000")
    p = provider(openai_server)
    await p.complete(request(), timeout_s=5)
    monkeypatch.setenv(KEY_ENV, "sk-second-key-11111")
    await p.complete(request(), timeout_s=5)
    assert [a.authorization for a in openai_server.arrivals] == ["Bearer sk-first-key-000000", "Bearer sk-second-key-11111"]


async def test_programming_errors_propagate_unmapped(
    openai_server: Any, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lit = await load_litellm()

    async def broken(**kwargs: Any) -> Any:
        raise KeyError("bug inside litellm's caller")

    monkeypatch.setattr(lit, "acompletion", broken)
    p = provider(openai_server)
    with pytest.raises(KeyError):
        await p.complete(request(), timeout_s=5)
    assert p.breaker.failures == 0  # not an operational failure of the deployment


async def test_usage_reaches_ksi_record_usage_through_the_host(lit_host: Any, openai_server: Any) -> None:
    recorder = UsageRecorder()
    async with lit_host(recorder) as host:
        result = await host.complete({"model": "gpt-test", "prompt": "one two three", "session_id": "s-1"})
    assert result.ok, result.error
    assert result.provider == "main"
    assert result.session_id == "s-1"
    assert result.text == "echo: one two three"
    assert [(c.provider, c.outcome, c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens)
            for c in recorder.calls] == [("main", "ok", 6, 4, 10)]
    assert result.usage.total_tokens == 10


async def test_own_deadline_when_litellm_does_not_give_up(
    openai_server: Any, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from ksi_provider_litellm.provider import TIMEOUT_GRACE_S

    lit = await load_litellm()
    seen: dict[str, Any] = {}

    async def stuck(**kwargs: Any) -> Any:
        seen.update(kwargs)
        await asyncio.sleep(60)

    monkeypatch.setattr(lit, "acompletion", stuck)
    p = provider(openai_server)
    t0 = time.monotonic()
    with pytest.raises(ProviderTimeout):
        await p.complete(request(), timeout_s=0.2)
    assert 0.2 + TIMEOUT_GRACE_S - 0.05 <= time.monotonic() - t0 < 0.2 + TIMEOUT_GRACE_S + 0.5
    assert (seen["timeout"], seen["num_retries"], seen["max_retries"]) == (0.2, 0, 0)
    assert p.breaker.failures == 1
