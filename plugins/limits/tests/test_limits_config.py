"""The [limits] table: defaults, and errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest
from ksi_limits.config import LimitsConfig
from ksi_limits.plugin import Plugin

from ksi_host import ConfigError
from ksi_host.testing import DirectQueue


async def start(make_host: Any, table: dict[str, Any]) -> Plugin:
    plugin = Plugin()
    async with make_host(DirectQueue(), plugin, config={"limits": table}):
        pass
    return plugin


async def test_defaults_and_a_full_table(make_host: Any) -> None:
    assert LimitsConfig().to_dict() == {"rules": [], "budgets": [], "chars_per_token": 4.0, "default_max_tokens": 1024,
                                        "budget_refresh_s": 5.0}
    plugin = await start(make_host, {
        "rules": [{"scope": "deployment", "match": "openai-main", "rpm": 600, "tpm": 200000, "concurrency": 8,
                   "window_s": 60},
                  {"scope": "agent", "concurrency": 2}],
    })
    deployment, agent = plugin.config.rules
    assert (deployment.rpm, deployment.tpm, deployment.concurrency, deployment.window_s) == (600, 200000, 8, 60.0)
    assert (agent.match, agent.rpm, agent.window_s) == ("*", None, 60.0)


@pytest.mark.parametrize(("table", "message"), [
    ({"rules": [{"scope": "session", "rpm": 1}]},
     "config table limits.rules[0]: scope must be one of deployment, agent, model; got 'session'"),
    ({"rules": [{"scope": "agent"}]}, "config table limits.rules[0]: a rule needs at least one of rpm, tpm, concurrency"),
    ({"rules": [{"scope": "agent", "rpm": 0}]}, "config table limits.rules[0]: rpm must be a positive integer"),
    ({"rules": [{"scope": "agent", "tpm": 1.5}]}, "config key limits.rules[0].tpm: expected an integer, got 1.5"),
    ({"rules": [{"scope": "agent", "tpm": 10, "window_s": 0}]}, "window_s must be a positive number, got 0"),
    ({"rules": [{"scope": "agent", "tpm": 10, "match": ""}]}, "match must be a non-empty name or glob"),
    ({"rules": [{"scope": "agent", "rmp": 10}]}, "config key limits.rules[0].rmp: unknown key"),
    ({"budgets": [{"scope": "agent"}]}, "config key limits.budgets[0].usd: is required"),
    ({"budgets": [{"scope": "agent", "usd": -1}]}, "usd must be a number >= 0, got -1"),
    ({"budgets": [{"scope": "agent", "usd": 1, "period": "week"}]}, "period must be one of day, month; got 'week'"),
    ({"budgets": [{"scope": "total", "usd": 1, "match": "x"}]}, "a total budget covers everything: leave match out"),
    ({"chars_per_token": 0}, "chars_per_token must be a positive number"),
    ({"default_max_tokens": 0}, "default_max_tokens must be a positive integer"),
])
async def test_bad_tables_stop_start_up_naming_the_key(make_host: Any, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        await start(make_host, table)
    assert message in str(e.value)
