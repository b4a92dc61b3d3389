"""The ``[openai]`` config table.

::

    [openai]
    priority = 100                    # lower is tried first when another provider plugin serves the model too
    max_connections = 100             # the pooled HTTP client's connection limit (all deployments together)
    trust_env = false                 # true: use HTTPS_PROXY etc. from the environment

    [[openai.deployments]]
    name = "openai-main"              # unique across the host; shows in results as `provider`
    model = "gpt-4o-mini"             # the model name requests ask for; glob patterns allowed
    upstream_model = "gpt-4o-mini"    # optional: the name sent upstream ("{model}" = the requested name)
    api_base = "https://api.openai.com/v1"   # optional (this is the default); vLLM, Ollama, OpenRouter: their /v1
    api_key_env = "OPENAI_API_KEY"    # optional: the variable holding the key; never the key itself
    timeout_s = 60
    allow_link_local = false          # true: api_base may be a link-local / cloud metadata address
    input_cost_per_mtok = 0.15        # optional: USD per million prompt tokens (else cost_usd is null)
    output_cost_per_mtok = 0.60       # optional: USD per million completion tokens
    headers = { "HTTP-Referer" = "https://example.org" }   # optional extra request headers (no secrets)

    [openai.circuit]
    failures_to_open = 5
    cooldown_s = 30
"""

from __future__ import annotations

import attrs

from ksi_host.providers import Deployment, ProviderConfig, deployments_field
from ksi_host.providers.validators import http_headers, opt_price, opt_str, positive_int

DEFAULT_API_BASE = "https://api.openai.com/v1"


@attrs.define(frozen=True)
class OpenAIDeployment(Deployment):
    """One ``[[openai.deployments]]`` entry: the shared Deployment keys plus this plugin's own.

    ``upstream_model``: the model name sent upstream. Absent, the requested
    name is sent as is; ``{model}`` in it is replaced by the requested name
    (with a glob ``model = "llama-*"``, ``upstream_model = "meta/{model}"``).
    ``api_base`` defaults to OpenAI's. Prices are USD per million tokens.
    ``headers``: extra request headers (printable ASCII values, no credentials).
    """

    upstream_model: str | None = attrs.field(default=None, validator=opt_str)
    input_cost_per_mtok: float | None = attrs.field(default=None, validator=opt_price)
    output_cost_per_mtok: float | None = attrs.field(default=None, validator=opt_price)
    headers: dict[str, str] = attrs.field(factory=dict, validator=http_headers)

    @property
    def url(self) -> str:
        """The chat completions URL."""
        return (self.api_base or DEFAULT_API_BASE).rstrip("/") + "/chat/completions"

    def model_for(self, requested: str) -> str:
        if self.upstream_model is None:
            return requested
        return self.upstream_model.replace("{model}", requested)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD for one call, or None when no price is configured."""
        if self.input_cost_per_mtok is None and self.output_cost_per_mtok is None:
            return None
        return (prompt_tokens * (self.input_cost_per_mtok or 0.0) + completion_tokens * (self.output_cost_per_mtok or 0.0)) / 1e6


@attrs.define(frozen=True)
class OpenAIConfig(ProviderConfig):
    """The ``[openai]`` table: the keys of every provider plugin
    (:class:`ksi_host.providers.ProviderConfig`: ``priority``, ``circuit``,
    ``deployments`` tried in the order written) and this plugin's own:
    ``max_connections``, the HTTP client's pool size; ``trust_env``, let the
    client read ``HTTPS_PROXY`` and friends (and ``~/.netrc``) from the
    environment.
    """

    max_connections: int = attrs.field(default=100, validator=positive_int)
    trust_env: bool = False
    deployments: list[OpenAIDeployment] = deployments_field()
