"""The chat surface through the openai plugin, against the local server over real HTTP: the provider
conformance suite (:mod:`ksi_host.testing.conformance`: every parameter sent as it is, tool calls and
their round trip, JSON mode, usage details, refusals, streaming, each fault mapped), then what is the
plugin's own: the deployment's prices on a streamed call's usage, and an endpoint that ignores ``stream``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from ksi_provider_openai.plugin import Plugin
from openai_helpers import deployment, request

from ksi_host.testing import UsageCalls
from ksi_host.testing.conformance import DeploymentSpec, ProviderConformance


class TestOpenAIConformance(ProviderConformance):
    PROVIDER_OPTIONS: ClassVar[dict[str, Any]] = {**ProviderConformance.PROVIDER_OPTIONS, "metadata": {"run": "r1"}}

    def plugin(self) -> Plugin:
        return Plugin()

    def config(self, deployments: Sequence[DeploymentSpec]) -> dict[str, Any]:
        return {"openai": {"deployments": [
            {"name": d.name, "model": d.model, "upstream_model": d.upstream_model, "api_base": d.api_base,
             "api_key_env": d.api_key_env, "timeout_s": d.timeout_s} for d in deployments]}}


async def test_a_streamed_calls_usage_is_priced_by_the_deployment(oa_host: Any, openai_server: Any) -> None:
    recorder = UsageCalls()
    async with oa_host(recorder, deployments=[deployment(openai_server, input_cost_per_mtok=1.0,
                                                         output_cost_per_mtok=2.0)]) as host:
        stream = host.stream({"model": "gpt-test", "prompt": "one two"})
        [d async for d in stream]
    sent = openai_server.arrivals[0].usage
    [call] = recorder.calls
    assert call.usage.cost_usd == pytest.approx((sent["prompt_tokens"] + 2 * sent["completion_tokens"]) / 1e6)
    assert stream.result is not None and stream.result.usage == call.usage


async def test_an_endpoint_that_ignores_stream_answers_as_one_piece(make_provider: Any, api_key: str) -> None:
    # an endpoint that does not stream: the test server, its body's "stream" taken out behind the provider's back
    p = make_provider()
    original = p.body
    p.body = lambda r, stream=False: {k: v for k, v in original(r, stream=stream).items()  # type: ignore[method-assign]
                                      if k not in ("stream", "stream_options")}
    pieces = [d async for d in p.stream(request(), timeout_s=5)]
    assert len(pieces) == 1 and pieces[0].content == "echo: hello there" and pieces[0].finish_reason == "stop"
    assert pieces[0].usage is not None
