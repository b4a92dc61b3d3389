"""``mock/<anything>``: served offline by the built-in deployment through litellm's mock_response."""

from __future__ import annotations

from typing import Any

from ksi_provider_litellm.plugin import Plugin
from provider_helpers import UsageRecorder

from ksi_host.testing import DirectQueue


async def test_mock_model_runs_with_no_config_no_network_no_key(make_host: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recorder = UsageRecorder()
    async with make_host(Plugin(), DirectQueue(), recorder) as host:  # no [litellm] table at all
        first = await host.complete({"model": "mock/anything", "prompt": "Summarise the plan", "session_id": "s9"})
        second = await host.complete({"model": "mock/anything", "prompt": "Summarise the plan"})
    assert first.ok, first.error
    assert first.provider == "mock"
    assert first.text == "mock response to: Summarise the plan"
    assert second.text == first.text  # deterministic
    assert first.session_id == "s9"
    # usage as litellm's mock path reports it; no cost for an unknown model
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (10, 20, 30)
    assert first.usage.cost_usd is None
    assert [c.provider for c in recorder.calls] == ["mock", "mock"]


async def test_mock_can_be_turned_off(make_host: Any) -> None:
    async with make_host(Plugin(), DirectQueue(), config={"litellm": {"mock": False}}) as host:
        result = await host.complete({"model": "mock/anything", "prompt": "hi"})
        providers = await host.providers()
    assert result.error is not None and result.error["type"] == "NoProviderError"
    assert providers == []


async def test_configured_deployments_come_before_the_builtin_mock(make_host: Any) -> None:
    config = {"litellm": {"deployments": [{"name": "my-mock", "model": "mock/special", "litellm_model": "openai/x",
                                           "api_base": "http://127.0.0.1:9/v1"}]}}
    async with make_host(Plugin(), DirectQueue(), config=config) as host:
        infos = await host.providers("mock/special")
    assert [i.name for i in infos] == ["my-mock", "mock"]
