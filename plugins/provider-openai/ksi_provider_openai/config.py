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
    input_cost_per_mtok = 0.15        # optional: USD per million prompt tokens (else cost_usd is null)
    output_cost_per_mtok = 0.60       # optional: USD per million completion tokens
    headers = { "HTTP-Referer" = "https://example.org" }   # optional extra request headers (no secrets)

    [openai.circuit]
    failures_to_open = 5
    cooldown_s = 30
"""

from __future__ import annotations

from typing import Any

import attrs

from ksi_host.providers.circuit import CircuitConfig
from ksi_host.providers.deployments import DEFAULT_PRIORITY, Deployment, check_unique_names
from ksi_host.providers.errormap import redact

DEFAULT_API_BASE = "https://api.openai.com/v1"
_RESERVED_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "content-type",
                               "content-length", "host"})


def _opt_str(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{a.name} must be a non-empty string or absent")


def _http_base(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError(f"api_base must start with http:// or https:// (the endpoint's /v1 URL), got {value!r}")


def _opt_price(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"{a.name} must be a number of USD per million tokens >= 0, or absent; got {value!r}")


def _headers(inst: Any, a: attrs.Attribute, value: Any) -> None:
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError("headers must be a table of header name = string value")
        if k.lower() in _RESERVED_HEADERS:
            raise ValueError(f"headers may not set {k!r} (the key comes from api_key_env, never from the file)")
        if redact(v) != v:
            raise ValueError(f"headers.{k} looks like it holds a secret; secrets never go in the config file")


@attrs.define(frozen=True)
class OpenAIDeployment(Deployment):
    """One ``[[openai.deployments]]`` entry: the shared Deployment keys plus this plugin's own.

    ``upstream_model``: the model name sent upstream. Absent, the requested
    name is sent as is; ``{model}`` in it is replaced by the requested name
    (with a glob ``model = "llama-*"``, ``upstream_model = "meta/{model}"``).
    ``api_base`` defaults to OpenAI's. Prices are USD per million tokens.
    """

    upstream_model: str | None = attrs.field(default=None, validator=_opt_str)
    input_cost_per_mtok: float | None = attrs.field(default=None, validator=_opt_price)
    output_cost_per_mtok: float | None = attrs.field(default=None, validator=_opt_price)
    headers: dict[str, str] = attrs.field(factory=dict, validator=_headers)

    def __attrs_post_init__(self) -> None:
        _http_base(self, attrs.fields(OpenAIDeployment).api_base, self.api_base)

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


def _deployments(inst: Any, a: attrs.Attribute, value: Any) -> None:
    check_unique_names(value)


def _priority(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be an integer (lower is tried first), got {value!r}")


def _positive(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{a.name} must be an integer >= 1, got {value!r}")


@attrs.define(frozen=True)
class OpenAIConfig:
    """The ``[openai]`` table.

    ``deployments``: tried in the order written. ``circuit``: when a
    deployment's circuit opens. ``priority``: this plugin's rank among
    provider plugins serving the same model (lower first; plugins stating
    none rank at 100; ties by plugin name). ``max_connections``: the HTTP
    client's pool size. ``trust_env``: let the client read ``HTTPS_PROXY``
    and friends (and ``~/.netrc``) from the environment.
    """

    priority: int = attrs.field(default=DEFAULT_PRIORITY, validator=_priority)
    max_connections: int = attrs.field(default=100, validator=_positive)
    trust_env: bool = False
    circuit: CircuitConfig = attrs.field(factory=CircuitConfig)
    deployments: list[OpenAIDeployment] = attrs.field(factory=list, validator=_deployments)
