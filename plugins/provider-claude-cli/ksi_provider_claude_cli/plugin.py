"""The ``claude_cli`` plugin: the ``claude`` command line as a provider, with session continuity.

Hooks: ``ksi_config_spec`` (the ``[claude_cli]`` table), ``ksi_startup``
(creates the ``claude_cli_sessions`` table, restores the circuits kept in
``claude_cli_circuits``; one
:class:`~ksi_provider_claude_cli.provider.ClaudeCliProvider` and circuit per
deployment), ``ksi_shutdown`` (writes pending circuit changes),
``ksi_select_provider``, ``ksi_list_providers`` and
``ksi_status`` (``{"claude_cli": {"executable": ..., "found": ..., "circuits": [...]}}``).

Selection follows the rules every provider plugin shares
(:class:`ksi_host.deployments.DeploymentPool`): deployments serving the model in
the order written, then the built-in ``claude-cli`` (``claude-cli/*``);
excluded and open-circuit ones skipped. Between provider plugins
(:meth:`ksi_host.deployments.DeploymentPool.select_ranked`): the hook is
``tryfirst`` and answers None while a better-ranked plugin (lower
``priority``, then name) has an available deployment for the model that is
not excluded, or while its own are all behind open circuits and another
plugin's is usable.
"""

from __future__ import annotations

import shutil
from typing import Any

from ksi_host import hookimpl
from ksi_host.circuit import CircuitBreaker
from ksi_host.deployments import DeploymentPool
from ksi_host.models import CompletionRequest, ProviderInfo

from .config import ClaudeCliConfig, builtin_deployment
from .provider import ClaudeCliProvider
from .sessions import SessionStore

TABLE = "claude_cli"
CIRCUITS_TABLE = "claude_cli_circuits"
"""Where the circuits are kept in the host database (``ksi-host status`` in another process sees them; a restart keeps them)."""


class Pool(DeploymentPool[ClaudeCliProvider]):
    """The shared DeploymentPool, reporting the plugin's ``priority`` and executable with each deployment."""

    def __init__(self, members: Any, *, priority: int, executable: str, **kw: Any) -> None:
        super().__init__(members, **kw)
        self.priority = priority
        self.executable = executable

    def describe(self, m: ClaudeCliProvider) -> dict[str, Any]:
        return {**super().describe(m), "priority": self.priority, "executable": self.executable}


def build_pool(config: ClaudeCliConfig, sessions: SessionStore | None, *, clock: Any) -> Pool:
    """The deployments of ``config`` in order, then the built-in one (if enabled)."""
    deployments = list(config.deployments) + ([builtin_deployment()] if config.builtin else [])
    return Pool(
        [ClaudeCliProvider(d, CircuitBreaker.from_config(config.circuit, clock=clock), executable=config.executable,
                           sessions=sessions) for d in deployments],
        priority=config.priority, executable=config.executable,
    )


class Plugin:
    """One instance per Host; holds the deployments, their circuits and the session store."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.sessions: SessionStore | None = None
        self._others = True  # do other plugins list providers? (set at start-up)

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, ClaudeCliConfig

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        self.sessions = SessionStore(host.db)
        await self.sessions.migrate()
        self.pool = build_pool(host.config[TABLE], self.sessions, clock=host.clock)
        await self.pool.attach(host.db, CIRCUITS_TABLE)
        hooks = getattr(host, "hooks", None)
        if hooks is not None:  # with no other provider plugin, selection skips the cross-plugin look-up
            self._others = any(getattr(fn, "__self__", None) is not self for _, fn, _ in hooks.impls("ksi_list_providers"))

    @hookimpl
    async def ksi_shutdown(self) -> None:
        if self.pool is not None:
            await self.pool.detach()

    def _pool(self, host: Any) -> Pool:
        if self.pool is None:  # hooks called before start-up (read-only use): no session store
            self.pool = build_pool(host.config.get(TABLE) or ClaudeCliConfig(), None, clock=host.clock)
        return self.pool

    @hookimpl(tryfirst=True)
    async def ksi_select_provider(self, host: Any, request: CompletionRequest,
                                  exclude: frozenset[str]) -> ClaudeCliProvider | None:
        pool = self.pool or self._pool(host)
        return await pool.select_ranked(host, request.model, exclude, plugin=TABLE, priority=pool.priority,
                                        others=self._others)

    @hookimpl
    def ksi_list_providers(self, host: Any, model: str | None) -> list[ProviderInfo]:
        return self._pool(host).infos(model, TABLE)

    @hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any]:
        pool = self._pool(host)
        return {TABLE: {
            "executable": pool.executable,
            "found": shutil.which(pool.executable),
            "priority": pool.priority,
            "sessions": await self.sessions.count() if self.sessions is not None else None,
            "circuits": pool.status(),
        }}
