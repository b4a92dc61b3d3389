"""The ``litellm`` plugin: provider selection and upstream calls through litellm.

Hooks: ``ksi_config_spec`` (the ``[litellm]`` table), ``ksi_startup`` (builds
one :class:`~ksi_provider_litellm.provider.LitellmProvider` and circuit per
deployment), ``ksi_select_provider``, ``ksi_list_providers`` and
``ksi_status`` (``{"circuits": [...]}``). The circuits are kept in the
table ``litellm_circuits`` of the host database: restored at start-up, written
in the background on every change (never a key: names and states only).

Selection: the deployments serving the requested model (exact name or glob),
in the order written; the first that is not in ``exclude`` and whose circuit
allows a call wins. None when no deployment serves the model or every one
that does is excluded (the host then raises NoProviderError). When the only
deployments left have open circuits, selection fails fast with a retryable
ProviderUnavailable whose ``retry_after`` is the shortest remaining cool-down.

Between provider plugins (:meth:`ksi_host.deployments.DeploymentPool.select_ranked`): the hook is
``tryfirst``; when another provider plugin with a better rank (lower
``priority``, then plugin name) has an available deployment for the model
that is not excluded, this plugin answers None and the host asks the next.

``mock/<anything>`` is served by the built-in deployment ``mock`` (unless
``mock = false``) through litellm's ``mock_response``: no network, no key.

Importing this module does not import litellm.
"""

from __future__ import annotations

from typing import Any

from ksi_host import hookimpl
from ksi_host.circuit import CircuitBreaker
from ksi_host.deployments import DeploymentPool
from ksi_host.models import CompletionRequest, ProviderInfo

from .config import MOCK_NAME, MOCK_PATTERN, LitellmConfig, LitellmDeployment
from .provider import LitellmProvider

TABLE = "litellm"
CIRCUITS_TABLE = "litellm_circuits"
"""Where the circuits are kept in the host database (so ``ksi-host status`` in another process sees them)."""


class Pool(DeploymentPool[LitellmProvider]):
    """The shared DeploymentPool, reporting the plugin's ``priority`` with each deployment."""

    def __init__(self, members: Any, *, priority: int, **kw: Any) -> None:
        super().__init__(members, **kw)
        self.priority = priority

    def describe(self, m: LitellmProvider) -> dict[str, Any]:
        return {**super().describe(m), "priority": self.priority}


class Plugin:
    """One instance per Host; holds the deployments and their circuits."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self._others = True  # do other plugins list providers? (set at start-up)

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, LitellmConfig

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        self.pool = build_pool(host.config[TABLE], clock=host.clock)
        await self.pool.attach(host.db, CIRCUITS_TABLE)
        hooks = getattr(host, "hooks", None)
        if hooks is not None:  # with no other provider plugin, selection skips the cross-plugin look-up
            self._others = any(getattr(fn, "__self__", None) is not self for _, fn, _ in hooks.impls("ksi_list_providers"))

    @hookimpl
    async def ksi_shutdown(self, host: Any) -> None:
        if self.pool is not None:
            await self.pool.detach()

    def _pool(self, host: Any) -> Pool:
        if self.pool is None:  # hooks called before start-up (tests calling hooks directly)
            self.pool = build_pool(host.config.get(TABLE) or LitellmConfig(), clock=host.clock)
        return self.pool

    @hookimpl(tryfirst=True)
    async def ksi_select_provider(self, host: Any, request: CompletionRequest,
                                  exclude: frozenset[str]) -> LitellmProvider | None:
        pool = self.pool or self._pool(host)
        return await pool.select_ranked(host, request.model, exclude, plugin=TABLE, priority=pool.priority,
                                        others=self._others)

    @hookimpl
    def ksi_list_providers(self, host: Any, model: str | None) -> list[ProviderInfo]:
        return self._pool(host).infos(model, TABLE)

    @hookimpl
    def ksi_status(self, host: Any) -> dict[str, Any]:
        return {"circuits": self._pool(host).status()}


def build_pool(config: LitellmConfig, *, clock: Any) -> Pool:
    """The deployments of ``config`` in order, then the built-in mock deployment (if enabled)."""
    providers = [
        LitellmProvider(d, CircuitBreaker.from_config(config.circuit, clock=clock)) for d in config.deployments
    ]
    if config.mock:
        mock = LitellmDeployment(name=MOCK_NAME, model=MOCK_PATTERN, timeout_s=60.0)
        providers.append(LitellmProvider(mock, CircuitBreaker.from_config(config.circuit, clock=clock), mock=True))
    return Pool(providers, priority=config.priority)
