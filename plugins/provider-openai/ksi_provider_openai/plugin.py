"""The ``openai`` plugin: provider selection and direct calls to OpenAI-compatible endpoints.

Hooks: ``ksi_config_spec`` (the ``[openai]`` table), ``ksi_startup`` (one
:class:`~ksi_provider_openai.provider.OpenAIProvider` and circuit per
deployment, sharing one pooled HTTP client), ``ksi_shutdown`` (closes the
client), ``ksi_select_provider``, ``ksi_list_providers`` and ``ksi_status``
(``{"openai": {"priority": ..., "circuits": [...]}}``).

Selection, the same rules as every provider plugin (:class:`ksi_host.providers.DeploymentPool`):
the deployments serving the requested model (exact name or glob) in the
order written; the first that is not in ``exclude`` and whose circuit allows
a call wins; None when none serves the model or all that do are excluded;
a fast, retryable ProviderUnavailable when the only ones left have open
circuits.

Between provider plugins: the host orders them by ``priority`` (lower first,
then plugin name; see ``ksi_select_provider`` in :mod:`ksi_host.hookspecs`),
and asks the next when this one answers None or raises ProviderUnavailable.

Circuits are kept in the host database (table ``openai_circuits``), as every
provider plugin does (:class:`ksi_host.providers.CircuitStore`). At start-up
(when the host serves) a deployment whose key variable is unset is logged as a
warning, and a model no deployment with its key serves stops start-up.
"""

from __future__ import annotations

from typing import Any

from ksi_host.providers import CircuitBreaker, DeploymentPool, ProviderPlugin

from .client import HttpClient
from .config import OpenAIConfig
from .provider import OpenAIProvider, log

TABLE = "openai"
CIRCUITS_TABLE = "openai_circuits"
"""Where the circuits are kept in the host database (``ksi-host status`` in another process sees them; a restart keeps them)."""


class Pool(DeploymentPool[OpenAIProvider]):
    """The shared DeploymentPool, reporting each deployment's ``url`` too."""

    def describe(self, m: OpenAIProvider) -> dict[str, Any]:
        return {**super().describe(m), "url": m.url}


def build_pool(config: OpenAIConfig, client: HttpClient, *, clock: Any) -> Pool:
    return Pool(
        [OpenAIProvider(d, CircuitBreaker.from_config(config.circuit, clock=clock), client) for d in config.deployments],
        priority=config.priority,
    )


class Plugin(ProviderPlugin):
    """One instance per Host; holds the deployments, their circuits and the HTTP client (the hooks:
    :class:`ksi_host.providers.ProviderPlugin`)."""

    TABLE = TABLE
    CONFIG = OpenAIConfig
    CIRCUITS_TABLE = CIRCUITS_TABLE
    log = log

    def __init__(self) -> None:
        super().__init__()
        self.client: HttpClient | None = None

    def build_pool(self, config: OpenAIConfig, host: Any) -> Pool:
        if self.client is None:  # one pooled client for every deployment (opened on the first call)
            self.client = HttpClient(config.max_connections, trust_env=config.trust_env)
        return build_pool(config, self.client, clock=host.clock)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def status(self, host: Any, pool: DeploymentPool[Any]) -> dict[str, Any]:
        return {TABLE: {"priority": pool.priority, "connections_open": bool(self.client and self.client.open),
                        "circuits": pool.status()}}
