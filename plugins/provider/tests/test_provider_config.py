"""The [litellm] table: validation errors name the key."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from ksi_provider_litellm.plugin import Plugin

from ksi_host import ConfigError, StartupError
from ksi_host.testing import DirectQueue

GOOD = {"name": "main", "model": "gpt-4o-mini", "litellm_model": "openai/gpt-4o-mini", "api_key_env": "KSI_TEST_CONFIG_KEY"}


@pytest.fixture(autouse=True)
def config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSI_TEST_CONFIG_KEY", "sk-test-config-0000")


async def start(make_host: Any, table: dict[str, Any]) -> None:
    async with make_host(Plugin(), DirectQueue(), config={"litellm": table}):
        pass


async def test_a_good_table_starts_and_defaults_apply(make_host: Any) -> None:
    async with make_host(Plugin(), DirectQueue(), config={"litellm": {"deployments": [GOOD]}}) as host:
        cfg = host.config["litellm"]
    d = cfg.deployments[0]
    assert (d.timeout_s, d.api_base) == (60.0, None)
    assert (cfg.circuit.failures_to_open, cfg.circuit.cooldown_s) == (5, 30.0)
    assert cfg.mock is True


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        ({"deployments": [{**GOOD, "api_key": "x"}]}, ["deployments[0]", "api_key", "api_key_env"]),
        ({"deployments": [{**GOOD, "timeout_s": "fast"}]}, ["deployments[0]", "timeout_s"]),
        ({"deployments": [{**GOOD, "timeout_s": -1}]}, ["timeout_s"]),
        ({"deployments": [{k: v for k, v in GOOD.items() if k != "model"}]}, ["model"]),
        ({"deployments": [GOOD, GOOD]}, ["'main'", "deployments[1]"]),
        ({"deployments": [{**GOOD, "name": "mock"}]}, ["'mock'", "reserved", "mock = false"]),
        ({"circuit": {"failures_to_open": 0}}, ["failures_to_open"]),
        ({"circuit": {"cooldown_s": -5}}, ["cooldown_s"]),
        ({"circuit": {"cooldown": 5}}, ["cooldown"]),
        ({"retries": 2}, ["retries"]),
        # values that validated, then failed or misbehaved at run time
        ({"deployments": [{**GOOD, "api_base": "127.0.0.1:45425"}]}, ["litellm.deployments[0]", "api_base must be an http"]),
        ({"deployments": [{**GOOD, "api_base": "file:///etc/passwd"}]}, ["api_base", "scheme 'file'"]),
        ({"deployments": [{**GOOD, "api_base": "gopher://example.org/"}]}, ["api_base", "scheme 'gopher'"]),
        ({"deployments": [{**GOOD, "api_base": "http://169.254.169.254/v1"}]}, ["api_base points at", "allow_link_local"]),
        ({"deployments": [{**GOOD, "api_base": "http://u:pw-SECRET@localhost/v1"}]}, ["api_base must not hold credentials"]),
        ({"deployments": [{**GOOD, "timeout_s": float("inf")}]}, ["litellm.deployments[0]", "timeout_s"]),
        ({"deployments": [{**GOOD, "timeout_s": float("nan")}]}, ["timeout_s"]),
        ({"circuit": {"cooldown_s": float("inf")}}, ["litellm.circuit", "cooldown_s"]),
        ({"circuit": {"cooldown_s": float("nan")}}, ["litellm.circuit", "cooldown_s"]),
    ],
)
async def test_config_errors_name_the_key(make_host: Any, table: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        await start(make_host, table)
    for needle in needles:
        assert needle in str(info.value)
    assert "SECRET" not in str(info.value)


async def test_api_key_env_holding_a_key_is_refused_without_repeating_it(make_host: Any) -> None:
    secret = "sk-proj-THIS-IS-A-REAL-LOOKING-KEY-123"
    with pytest.raises(ConfigError) as info:
        await start(make_host, {"deployments": [{**GOOD, "api_key_env": secret}]})
    assert "api_key_env" in str(info.value)
    assert "never the key itself" in str(info.value)
    assert secret not in str(info.value)


async def test_name_mock_is_allowed_when_the_builtin_is_off(make_host: Any) -> None:
    await start(make_host, {"mock": False, "deployments": [{**GOOD, "name": "mock"}]})


async def test_a_link_local_api_base_is_allowed_when_the_deployment_says_so(make_host: Any) -> None:
    await start(make_host, {"deployments": [{**GOOD, "api_base": "http://169.254.10.10/v1", "allow_link_local": True}]})


async def test_an_unset_key_stops_start_up_naming_the_variable_and_the_mock_needs_none(
    make_host: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.delenv("KSI_TEST_CONFIG_KEY")
    with pytest.raises(StartupError) as info:
        await start(make_host, {"deployments": [GOOD]})
    assert "'gpt-4o-mini'" in str(info.value) and "KSI_TEST_CONFIG_KEY" in str(info.value)
    assert any(r.name == "ksi_host.provider.litellm" and "'main'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with make_host(Plugin(), DirectQueue(), config={"litellm": {}}) as host:  # only the mock: no key
        assert (await host.complete({"model": "mock/x", "prompt": "hi"})).ok
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
