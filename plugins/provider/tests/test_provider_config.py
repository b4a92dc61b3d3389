"""The [litellm] table: validation errors name the key."""

from __future__ import annotations

from typing import Any

import pytest
from ksi_provider_litellm.plugin import Plugin

from ksi_host import ConfigError
from ksi_host.testing import DirectQueue

GOOD = {"name": "main", "model": "gpt-4o-mini", "litellm_model": "openai/gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}


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
    ],
)
async def test_config_errors_name_the_key(make_host: Any, table: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        await start(make_host, table)
    for needle in needles:
        assert needle in str(info.value)


async def test_api_key_env_holding_a_key_is_refused_without_repeating_it(make_host: Any) -> None:
    secret = "sk-proj-THIS-IS-A-REAL-LOOKING-KEY-123"
    with pytest.raises(ConfigError) as info:
        await start(make_host, {"deployments": [{**GOOD, "api_key_env": secret}]})
    assert "api_key_env" in str(info.value)
    assert "never the key itself" in str(info.value)
    assert secret not in str(info.value)


async def test_name_mock_is_allowed_when_the_builtin_is_off(make_host: Any) -> None:
    await start(make_host, {"mock": False, "deployments": [{**GOOD, "name": "mock"}]})
