"""Choosing a deployment: order, exclude, globs, circuits, NoProviderError, status."""

from __future__ import annotations

from typing import Any

import pytest
from ksi_provider_litellm.config import LitellmConfig, LitellmDeployment
from ksi_provider_litellm.plugin import Plugin, build_pool
from provider_helpers import FailOver, FakeClock, deployment, request

from ksi_host import ProviderInfo, ProviderUnavailable
from ksi_host.providers.circuit import CircuitConfig


def pool_of(server: Any, *deps: dict[str, Any], clock: FakeClock | None = None, **circuit: Any) -> Any:
    cfg = LitellmConfig(deployments=[LitellmDeployment(**d) for d in deps], circuit=CircuitConfig(**circuit))
    return build_pool(cfg, clock=clock or FakeClock())


def two(server: Any) -> list[dict[str, Any]]:
    return [deployment(server, "a", model="gpt-x", upstream="openai/a-model"),
            deployment(server, "b", model="gpt-x", upstream="openai/b-model")]


def test_deployments_are_tried_in_the_order_written(openai_server: Any) -> None:
    pool = pool_of(openai_server, *two(openai_server))
    assert pool.select("gpt-x").name == "a"
    assert pool.select("gpt-x", frozenset({"a"})).name == "b"
    assert pool.select("gpt-x", frozenset({"a", "b"})) is None  # every serving deployment excluded
    assert pool.select("other") is None


def test_glob_patterns_and_model_placeholder(openai_server: Any) -> None:
    pool = pool_of(openai_server,
                   deployment(openai_server, "exact", model="gpt-4o", upstream="openai/gpt-4o-exact"),
                   deployment(openai_server, "family", model="gpt-*", upstream="openai/{model}"),
                   deployment(openai_server, "passthrough", model="openai/*", upstream=None) | {"litellm_model": None})
    assert pool.select("gpt-4o").name == "exact"
    assert pool.select("gpt-4o-mini").name == "family"
    assert pool.select("openai/anything").name == "passthrough"
    assert pool.select("claude-3") is None
    fam = pool.get("family")
    assert fam._kwargs(request(model="gpt-4o-mini"), 5, None)["model"] == "openai/gpt-4o-mini"
    assert pool.get("passthrough")._kwargs(request(model="openai/x"), 5, None)["model"] == "openai/x"
    assert pool.get("exact")._kwargs(request(model="gpt-4o"), 5, None)["model"] == "openai/gpt-4o-exact"


async def test_failover_to_the_next_deployment_through_the_host(lit_host: Any, openai_server: Any) -> None:
    openai_server.set_faults(faults_by_model={"a-model": "500"})
    policy = FailOver()
    async with lit_host(policy, deployments=two(openai_server)) as host:
        result = await host.complete(request(model="gpt-x"))
    assert result.ok, result.error
    assert result.provider == "b"
    assert [(a.provider, a.error_type) for a in result.attempts] == [("a", "ProviderUnavailable"), ("b", None)]
    assert [a.model for a in openai_server.arrivals] == ["a-model", "b-model"]  # one attempt each


async def test_no_provider_error_names_the_model_and_the_configured_models(lit_host: Any, openai_server: Any) -> None:
    async with lit_host(deployments=two(openai_server) + [deployment(openai_server, "c", model="claude-*")]) as host:
        result = await host.complete(request(model="llama-3"))
    assert result.error is not None
    assert result.error["type"] == "NoProviderError"
    msg = result.error["message"]
    assert "'llama-3'" in msg
    for configured in ("gpt-x", "claude-*", "mock/*"):
        assert configured in msg
    assert openai_server.hits == 0


async def test_every_deployment_failed_gives_no_provider_left(lit_host: Any, openai_server: Any) -> None:
    openai_server.set_faults(faults_by_model={"a-model": "503", "b-model": "503"})
    async with lit_host(FailOver(), deployments=two(openai_server)) as host:
        result = await host.complete(request(model="gpt-x"))
    assert result.error is not None and result.error["type"] == "NoProviderError"
    assert "no provider left" in result.error["message"]
    assert openai_server.hits == 2


async def test_circuit_opens_after_consecutive_failures_and_half_opens_after_cooldown(openai_server: Any, api_key: str) -> None:
    clock = FakeClock()
    pool = pool_of(openai_server, *two(openai_server), clock=clock, failures_to_open=2, cooldown_s=10)
    a = pool.get("a")
    openai_server.set_faults(faults_by_model={"a-model": "500"})
    for _ in range(2):
        assert pool.select("gpt-x") is a
        with pytest.raises(ProviderUnavailable):
            await a.complete(request(model="gpt-x"), timeout_s=5)
    assert a.breaker.state == "open"
    assert pool.select("gpt-x").name == "b"  # a is skipped while open
    clock.advance(9.9)
    assert pool.select("gpt-x").name == "b"
    clock.advance(0.1)
    assert pool.select("gpt-x") is a  # the one trial call (half-open)
    assert a.breaker.state == "half_open"
    assert pool.select("gpt-x").name == "b"  # only one trial at a time
    openai_server.set_faults(faults_by_model={})
    await a.complete(request(model="gpt-x"), timeout_s=5)
    assert a.breaker.state == "closed"
    assert pool.select("gpt-x") is a


async def test_failed_trial_reopens_the_circuit(openai_server: Any, api_key: str) -> None:
    clock = FakeClock()
    pool = pool_of(openai_server, *two(openai_server), clock=clock, failures_to_open=1, cooldown_s=5)
    a = pool.get("a")
    openai_server.set_faults(faults_by_model={"a-model": "429"})
    with pytest.raises(Exception):  # noqa: B017 - the mapping is tested elsewhere
        await a.complete(request(model="gpt-x"), timeout_s=5)
    assert a.breaker.state == "open"
    clock.advance(5)
    assert pool.select("gpt-x") is a
    with pytest.raises(Exception):  # noqa: B017
        await a.complete(request(model="gpt-x"), timeout_s=5)
    assert a.breaker.state == "open"
    assert a.breaker.cooldown_left() == 5
    assert pool.select("gpt-x").name == "b"


async def test_bad_requests_do_not_open_the_circuit(openai_server: Any, api_key: str) -> None:
    pool = pool_of(openai_server, *two(openai_server), failures_to_open=1)
    a = pool.get("a")
    openai_server.script("400", "context_length")
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017
            await a.complete(request(model="gpt-x"), timeout_s=5)
    assert a.breaker.state == "closed"


async def test_all_open_fails_fast_with_retry_after(openai_server: Any, api_key: str) -> None:
    clock = FakeClock()
    pool = pool_of(openai_server, *two(openai_server), clock=clock, failures_to_open=1, cooldown_s=30)
    openai_server.set_faults(faults_by_model={"a-model": "500", "b-model": "500"})
    for name in ("a", "b"):
        with pytest.raises(ProviderUnavailable):
            await pool.get(name).complete(request(model="gpt-x"), timeout_s=5)
        clock.advance(10)
    with pytest.raises(ProviderUnavailable) as info:
        pool.select("gpt-x")
    assert info.value.retry_after == pytest.approx(10)  # a's cool-down ends first
    assert "open circuit" in info.value.message and "a (open" in info.value.message
    assert openai_server.hits == 2
    # excluded + open: the open one is still reported, the excluded one is not
    with pytest.raises(ProviderUnavailable) as info:
        pool.select("gpt-x", frozenset({"a"}))
    assert info.value.retry_after == pytest.approx(20)


async def test_circuit_state_is_visible_in_status_and_list_providers(lit_host: Any, openai_server: Any, clock: FakeClock) -> None:
    openai_server.set_faults(faults_by_model={"a-model": "500"})
    async with lit_host(deployments=two(openai_server), circuit={"failures_to_open": 1, "cooldown_s": 30}, clock=clock) as host:
        await host.complete(request(model="gpt-x"))
        status = await host.status()
        infos = await host.providers("gpt-x")
        all_infos = await host.providers()
    circuits = {c["name"]: c for c in status["circuits"]}
    assert circuits["a"]["state"] == "open"
    assert circuits["a"]["failures"] == 1
    assert circuits["a"]["cooldown_left_s"] == 30
    assert circuits["a"]["opens_until"] is not None
    assert "ProviderUnavailable" in circuits["a"]["last_error"]
    assert circuits["b"]["state"] == "closed"
    assert circuits["mock"]["model"] == "mock/*"
    assert [(i.name, i.model, i.plugin, i.state) for i in infos] == [("a", "gpt-x", "litellm", "open"),
                                                                     ("b", "gpt-x", "litellm", "closed")]
    assert all(isinstance(i, ProviderInfo) for i in all_infos)
    assert [i.name for i in all_infos] == ["a", "b", "mock"]
    assert infos[0].detail["litellm_model"] == "openai/a-model"
    assert infos[0].detail["api_key_env"] is not None


async def test_hooks_work_when_called_before_startup(openai_server: Any) -> None:
    class FakeHost:
        config = {"litellm": LitellmConfig(deployments=[LitellmDeployment(**deployment(openai_server))])}
        clock = FakeClock()

        async def providers(self, model: str | None) -> list[ProviderInfo]:
            return []

    plugin = Plugin()
    assert [i.name for i in plugin.ksi_list_providers(FakeHost(), None)] == ["main", "mock"]
    assert plugin.ksi_select_provider(FakeHost(), request(), frozenset()).name == "main"


async def test_circuits_survive_a_restart_and_show_in_a_read_only_status(lit_host: Any, openai_server: Any) -> None:
    openai_server.set_faults(faults_by_model={"a-model": "503"})
    circuit = {"failures_to_open": 1, "cooldown_s": 300}
    async with lit_host(deployments=two(openai_server), circuit=circuit) as host:
        await host.complete(request(model="gpt-x"))
    # a second host on the same database, as `ksi-host status` would open it
    async with lit_host(deployments=two(openai_server), circuit=circuit, serve=False) as host:
        circuits = {c["name"]: c for c in (await host.status())["circuits"]}
        infos = await host.providers("gpt-x")
    assert circuits["a"]["state"] == "open"
    assert 290 < circuits["a"]["cooldown_left_s"] <= 300
    assert "ProviderUnavailable" in circuits["a"]["last_error"]
    assert [(i.name, i.state) for i in infos] == [("a", "open"), ("b", "closed")]
    assert openai_server.hits == 1


@pytest.mark.parametrize(("priority", "winner"), [(50, "main"), (200, "other")])
async def test_priority_between_provider_plugins(lit_host: Any, openai_server: Any, priority: int, winner: str) -> None:
    from ksi_host.testing import FakeProvider, ScriptedProviders

    other = ScriptedProviders(FakeProvider("other", model="gpt-test"))  # reports no priority: ranks at 100
    async with lit_host(other, FailOver(), settings={"priority": priority}) as host:
        result = await host.complete(request())
        infos = await host.providers("gpt-test")
    assert result.ok and result.provider == winner
    assert [i.priority for i in infos if i.plugin == "litellm"] == [priority]
    assert all("priority" not in i.detail for i in infos)


async def test_outranked_plugin_still_serves_when_the_better_one_is_excluded(lit_host: Any, openai_server: Any) -> None:
    from ksi_host import RateLimited
    from ksi_host.testing import FakeProvider, ScriptedProviders

    other = ScriptedProviders(FakeProvider("other", model="gpt-test", script=[RateLimited("busy")]))
    policy = FailOver()
    async with lit_host(other, policy, settings={"priority": 200}) as host:
        result = await host.complete(request())
    assert result.ok, result.error
    assert [(a.provider, a.error_type) for a in result.attempts] == [("other", "RateLimited"), ("main", None)]


async def test_priority_key_is_validated(make_host: Any) -> None:
    from ksi_host import ConfigError
    from ksi_host.testing import DirectQueue

    with pytest.raises(ConfigError, match="priority"):
        async with make_host(Plugin(), DirectQueue(), config={"litellm": {"priority": "high"}}):
            pass
    async with make_host(Plugin(), DirectQueue(), config={"litellm": {"priority": 7}}) as host:
        assert host.config["litellm"].priority == 7
