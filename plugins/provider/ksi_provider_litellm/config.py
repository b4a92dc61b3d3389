"""The ``[litellm]`` config table.

::

    [[litellm.deployments]]
    name = "openai-main"              # unique; shows in results as `provider`
    model = "gpt-4o-mini"             # the model name requests ask for; glob patterns allowed
    litellm_model = "openai/gpt-4o-mini"
    api_base = "https://..."          # optional: an http(s) URL, no credentials in it
    api_key_env = "OPENAI_API_KEY"    # the variable holding the key; never the key itself
    timeout_s = 60
    allow_link_local = false          # true: api_base may be a link-local / cloud metadata address

    [litellm.circuit]
    failures_to_open = 5
    cooldown_s = 30

    [litellm]
    priority = 100                    # lower is tried first when another provider plugin serves the model too
    mock = true                       # serve mock/<anything> offline
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ksi_host.providers import Deployment, ProviderConfig, deployments_field
from ksi_host.providers.validators import opt_str

MOCK_NAME = "mock"
"""The name of the built-in deployment that serves ``mock/<anything>``."""
MOCK_PATTERN = "mock/*"


@attrs.define(frozen=True)
class LitellmDeployment(Deployment):
    """One ``[[litellm.deployments]]`` entry.

    ``litellm_model`` is the model name litellm is called with
    (``openai/gpt-4o-mini``). Absent, the requested model name is passed on
    as is; ``{model}`` in it is replaced by the requested name (useful with a
    glob ``model``: ``model = "gpt-*"``, ``litellm_model = "openai/{model}"``).
    """

    litellm_model: str | None = attrs.field(default=None, validator=opt_str)

    def upstream_model(self, requested: str) -> str:
        if self.litellm_model is None:
            return requested
        return self.litellm_model.replace("{model}", requested) if "{model}" in self.litellm_model else self.litellm_model


@attrs.define(frozen=True)
class LitellmConfig(ProviderConfig):
    """The ``[litellm]`` table: the keys of every provider plugin
    (:class:`ksi_host.providers.ProviderConfig`: ``priority``, ``circuit``,
    ``deployments`` tried in the order written) and ``mock``: serve
    ``mock/<anything>`` with the built-in offline deployment ``mock``
    (litellm's ``mock_response``).
    """

    mock: bool = True
    deployments: list[LitellmDeployment] = deployments_field()

    def reserved_names(self) -> Mapping[str, str]:
        if not self.mock:
            return {}
        return {MOCK_NAME: f"for the built-in deployment serving {MOCK_PATTERN} (set mock = false to use it)"}
