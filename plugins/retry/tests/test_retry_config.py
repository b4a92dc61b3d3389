from __future__ import annotations

from typing import Any

import pytest
from ksi_retry import ModelRetry, Plugin, RetryConfig, RetrySettings

from ksi_host.errors import ConfigError


def test_defaults() -> None:
    c = RetryConfig()
    assert (c.base_delay_s, c.max_delay_s, c.max_attempts, c.seed, c.models) == (1.0, 60.0, 5, None, {})
    assert c.settings_for("gpt-4o") == RetrySettings(1.0, 60.0, 5)


def test_model_overrides_inherit_unset_keys() -> None:
    c = RetryConfig(base_delay_s=2, models={"gpt-4o*": ModelRetry(max_attempts=8)})
    assert c.settings_for("gpt-4o-mini") == RetrySettings(2.0, 60.0, 8, "gpt-4o*")
    assert c.settings_for("claude-3") == RetrySettings(2.0, 60.0, 5)


def test_exact_key_wins_then_first_pattern_in_order() -> None:
    c = RetryConfig(models={
        "gpt-*": ModelRetry(max_attempts=2),
        "gpt-4o*": ModelRetry(max_attempts=3),
        "gpt-4o": ModelRetry(max_attempts=4),
    })
    assert c.settings_for("gpt-4o").max_attempts == 4
    assert c.settings_for("gpt-4o-mini").max_attempts == 2
    assert c.settings_for("GPT-4o-mini").max_attempts == 5  # case-sensitive


async def start(make_host: Any, table: dict[str, Any]) -> None:
    async with make_host(Plugin(), config={"retry": table}):
        pass


async def test_config_table_is_validated_by_the_host(make_host: Any) -> None:
    toml_like = {"base_delay_s": 0.5, "max_delay_s": 8, "max_attempts": 3, "seed": 11,
                 "models": {"gpt-4o*": {"max_attempts": 6, "max_delay_s": 30}}}
    async with make_host(Plugin(), config={"retry": toml_like}) as host:
        c = host.config["retry"]
        assert isinstance(c, RetryConfig)
        assert c.settings_for("gpt-4o-2024").max_attempts == 6
        assert c.settings_for("gpt-4o-2024").max_delay_s == 30.0
        assert (await host.status())["retry"]["models"]["gpt-4o*"]["max_attempts"] == 6


@pytest.mark.parametrize(
    ("table", "names"),
    [
        ({"max_attempts": 0}, ["retry", "max_attempts", "0"]),
        ({"max_attempts": 2.5}, ["retry", "max_attempts", "integer"]),
        ({"base_delay_s": -1}, ["retry", "base_delay_s", "-1"]),
        ({"max_delay_s": "60"}, ["retry", "max_delay_s", "number"]),
        ({"base_delay_s": 5, "max_delay_s": 2}, ["retry", "max_delay_s (2.0) must not be less than base_delay_s (5"]),
        ({"seed": "x"}, ["retry", "seed"]),
        ({"retries": 3}, ["retry", "retries", "unknown"]),
        ({"models": {"gpt-4o*": {"max_attempts": -2}}}, ["gpt-4o*", "max_attempts", "-2"]),
        ({"models": {"gpt-4o*": {"base_delay_s": 90}}}, ["gpt-4o*", "max_delay_s (60.0) must not be less than base_delay_s (90"]),
        ({"models": {"gpt-4o*": {"delay": 1}}}, ["gpt-4o*", "delay", "unknown"]),
        ({"models": {"gpt-4o*": 3}}, ["gpt-4o*", "expected a table"]),
    ],
)
async def test_config_errors_name_the_key(make_host: Any, table: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        await start(make_host, table)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize("kw", [{"base_delay_s": True}, {"max_delay_s": float("inf")}, {"max_attempts": True}])
def test_direct_construction_is_validated_too(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        RetryConfig(**kw)


def test_entry_point_names_the_plugin_class() -> None:
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="ksi_host") if ep.name == "retry"]
    assert ep.value == "ksi_retry.plugin:Plugin"
    assert ep.load() is Plugin
    assert ep.dist is not None and ep.dist.name == "ksi-retry"
