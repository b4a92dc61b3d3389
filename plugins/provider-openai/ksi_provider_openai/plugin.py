"""The ``openai`` plugin: provider selection and direct calls to OpenAI-compatible endpoints.

Hooks: ``ksi_config_spec`` (the ``[openai]`` table), ``ksi_startup`` (one
:class:`~ksi_provider_openai.provider.OpenAIProvider` and circuit per
deployment, sharing one pooled HTTP client), ``ksi_shutdown`` (closes the
client), ``ksi_select_provider``, ``ksi_list_providers`` and ``ksi_status``
(``{"openai": {"priority": ..., "circuits": [...]}}``).

Selection, the same rules as every provider plugin (:class:`ksi_host.providers.deployments.DeploymentPool`):
the deployments serving the requested model (exact name or glob) in the
order written; the first that is not in ``exclude`` and whose circuit allows
a call wins; None when none serves the model or all that do are excluded;
a fast, retryable ProviderUnavailable when the only ones left have open
circuits.

Between provider plugins (:meth:`ksi_host.providers.deployments.DeploymentPool.select_ranked`):
the hook is ``tryfirst``; when another provider plugin with a better rank
(lower ``priority``, then plugin name) has an available deployment for the
model that is not excluded, or when this plugin's deployments are all behind
open circuits and another plugin's is usable, this plugin answers None and the
host asks the next.

Circuits are kept in the host database (table ``openai_circuits``), as every
provider plugin does (:meth:`ksi_host.providers.deployments.DeploymentPool.attach`).
"""

from __future__ import annotations

from typing import Any

from ksi_host.providers.circuit import CircuitBreaker
from ksi_host.providers.deployments import DeploymentPool
from ksi_host.providers.plugin import ProviderPlugin

from .client import HttpClient
from .config import OpenAIConfig
from .provider import OpenAIProvider

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
    :class:`ksi_host.providers.plugin.ProviderPlugin`)."""

    TABLE = TABLE
    CONFIG = OpenAIConfig
    CIRCUITS_TABLE = CIRCUITS_TABLE

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
