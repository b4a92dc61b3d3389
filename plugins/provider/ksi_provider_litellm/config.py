"""The ``[litellm]`` config table.

::

    [[litellm.deployments]]
    name = "openai-main"              # unique; shows in results as `provider`
    model = "gpt-4o-mini"             # the model name requests ask for; glob patterns allowed
    litellm_model = "openai/gpt-4o-mini"
    api_base = "https://..."          # optional
    api_key_env = "OPENAI_API_KEY"    # the variable holding the key; never the key itself
    timeout_s = 60

    [litellm.circuit]
    failures_to_open = 5
    cooldown_s = 30

    [litellm]
    priority = 100                    # lower is tried first when another provider plugin serves the model too
    mock = true                       # serve mock/<anything> offline
"""

from __future__ import annotations

from typing import Any

import attrs

from ksi_host.providers.circuit import CircuitConfig
from ksi_host.providers.deployments import DEFAULT_PRIORITY, Deployment, check_unique_names

MOCK_NAME = "mock"
"""The name of the built-in deployment that serves ``mock/<anything>``."""
MOCK_PATTERN = "mock/*"


def _opt_litellm_model(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{a.name} must be a non-empty string or absent")


@attrs.define(frozen=True)
class LitellmDeployment(Deployment):
    """One ``[[litellm.deployments]]`` entry.

    ``litellm_model`` is the model name litellm is called with
    (``openai/gpt-4o-mini``). Absent, the requested model name is passed on
    as is; ``{model}`` in it is replaced by the requested name (useful with a
    glob ``model``: ``model = "gpt-*"``, ``litellm_model = "openai/{model}"``).
    """

    litellm_model: str | None = attrs.field(default=None, validator=_opt_litellm_model)

    def upstream_model(self, requested: str) -> str:
        if self.litellm_model is None:
            return requested
        return self.litellm_model.replace("{model}", requested) if "{model}" in self.litellm_model else self.litellm_model


def _deployments(inst: Any, a: attrs.Attribute, value: Any) -> None:
    why = f"for the built-in deployment serving {MOCK_PATTERN} (set mock = false to use it)"
    check_unique_names(value, {MOCK_NAME: why} if inst.mock else None)


def _priority(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be an integer (lower is tried first), got {value!r}")


@attrs.define(frozen=True)
class LitellmConfig:
    """The ``[litellm]`` table.

    ``deployments``: tried in the order written. ``circuit``: when a
    deployment's circuit opens. ``mock``: serve ``mock/<anything>`` with the
    built-in offline deployment ``mock`` (litellm's ``mock_response``).
    ``priority``: this plugin's rank among provider plugins serving the same
    model (lower first; plugins stating none rank at 100; ties by plugin name).
    """

    priority: int = attrs.field(default=DEFAULT_PRIORITY, validator=_priority)
    mock: bool = True
    circuit: CircuitConfig = attrs.field(factory=CircuitConfig)
    deployments: list[LitellmDeployment] = attrs.field(factory=list, validator=_deployments)
