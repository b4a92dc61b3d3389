"""The ``openai`` plugin: provider selection and direct calls to OpenAI-compatible endpoints.

Hooks: ``ksi_config_spec`` (the ``[openai]`` table), ``ksi_startup`` (one
:class:`~ksi_provider_openai.provider.OpenAIProvider` and circuit per
deployment, sharing one pooled HTTP client), ``ksi_shutdown`` (closes the
client), ``ksi_select_provider``, ``ksi_list_providers`` and ``ksi_status``
(``{"openai": {"priority": ..., "circuits": [...]}}``).

Selection, the same rules as every provider plugin (:class:`ksi_host.deployments.DeploymentPool`):
the deployments serving the requested model (exact name or glob) in the
order written; the first that is not in ``exclude`` and whose circuit allows
a call wins; None when none serves the model or all that do are excluded;
a fast, retryable ProviderUnavailable when the only ones left have open
circuits.

Between provider plugins (:meth:`ksi_host.deployments.DeploymentPool.select_ranked`):
the hook is ``tryfirst``; when another provider plugin with a better rank
(lower ``priority``, then plugin name) has an available deployment for the
model that is not excluded, or when this plugin's deployments are all behind
open circuits and another plugin's is usable, this plugin answers None and the
host asks the next.

Circuits are kept in the host database (table ``openai_circuits``), as every
provider plugin does (:meth:`ksi_host.deployments.DeploymentPool.attach`).
"""

from __future__ import annotations

from typing import Any

from ksi_host import hookimpl
from ksi_host.circuit import CircuitBreaker
from ksi_host.deployments import DeploymentPool
from ksi_host.models import CompletionRequest, ProviderInfo

from .client import HttpClient
from .config import OpenAIConfig
from .provider import OpenAIProvider

TABLE = "openai"
CIRCUITS_TABLE = "openai_circuits"
"""Where the circuits are kept in the host database (``ksi-host status`` in another process sees them; a restart keeps them)."""


class Pool(DeploymentPool[OpenAIProvider]):
    """The shared DeploymentPool, reporting the plugin's ``priority`` with each deployment."""

    def __init__(self, members: Any, *, priority: int, **kw: Any) -> None:
        super().__init__(members, **kw)
        self.priority = priority

    def describe(self, m: OpenAIProvider) -> dict[str, Any]:
        return {**super().describe(m), "priority": self.priority, "url": m.url}


def build_pool(config: OpenAIConfig, client: HttpClient, *, clock: Any) -> Pool:
    return Pool(
        [OpenAIProvider(d, CircuitBreaker.from_config(config.circuit, clock=clock), client) for d in config.deployments],
        priority=config.priority,
    )


class Plugin:
    """One instance per Host; holds the deployments, their circuits and the HTTP client."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.client: HttpClient | None = None
        self._others = True  # do other plugins list providers? (set at start-up)

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, OpenAIConfig

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        await self._pool(host).attach(host.db, CIRCUITS_TABLE)
        hooks = getattr(host, "hooks", None)
        if hooks is not None:  # with no other provider plugin, selection skips the cross-plugin look-up
            self._others = any(getattr(fn, "__self__", None) is not self for _, fn, _ in hooks.impls("ksi_list_providers"))

    @hookimpl
    async def ksi_shutdown(self) -> None:
        if self.pool is not None:
            await self.pool.detach()
        if self.client is not None:
            await self.client.close()

    def _pool(self, host: Any) -> Pool:
        if self.pool is None:  # hooks called before start-up (tests calling hooks directly)
            config = host.config.get(TABLE) or OpenAIConfig()
            self.client = HttpClient(config.max_connections, trust_env=config.trust_env)
            self.pool = build_pool(config, self.client, clock=host.clock)
        return self.pool

    @hookimpl(tryfirst=True)
    async def ksi_select_provider(self, host: Any, request: CompletionRequest, exclude: frozenset[str]) -> OpenAIProvider | None:
        pool = self.pool or self._pool(host)
        return await pool.select_ranked(host, request.model, exclude, plugin=TABLE, priority=pool.priority,
                                        others=self._others)

    @hookimpl
    def ksi_list_providers(self, host: Any, model: str | None) -> list[ProviderInfo]:
        return self._pool(host).infos(model, TABLE)

    @hookimpl
    def ksi_status(self, host: Any) -> dict[str, Any]:
        pool = self._pool(host)
        return {TABLE: {"priority": pool.priority, "connections_open": bool(self.client and self.client.open),
                        "circuits": pool.status()}}
