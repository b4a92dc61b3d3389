"""The ``claude_cli`` plugin: the ``claude`` command line as a provider, with session continuity.

Hooks: ``ksi_config_spec`` (the ``[claude_cli]`` table), ``ksi_startup``
(creates the ``claude_cli_sessions`` table, restores the circuits kept in
``claude_cli_circuits``; one
:class:`~ksi_provider_claude_cli.provider.ClaudeCliProvider` and circuit per
deployment), ``ksi_shutdown`` (writes pending circuit changes),
``ksi_select_provider``, ``ksi_list_providers`` and
``ksi_status`` (``{"claude_cli": {"executable": ..., "found": ..., "circuits": [...]}}``).

Selection follows the rules every provider plugin shares
(:class:`ksi_host.providers.DeploymentPool`): deployments serving the model in
the order written, then the built-in ``claude-cli`` (``claude-cli/*``);
excluded and open-circuit ones skipped. Between provider plugins, the host
orders them by ``priority`` (lower first, then plugin name; see
``ksi_select_provider`` in :mod:`ksi_host.hookspecs`) and asks the next when
this one answers None or raises ProviderUnavailable. At start-up (when the
host serves) a deployment whose key variable is unset is logged as a warning,
and a model no deployment with its key serves stops start-up.
"""

from __future__ import annotations

import shutil
from typing import Any

from ksi_host import hookimpl
from ksi_host.providers import CircuitBreaker, DeploymentPool, ProviderPlugin

from .config import ClaudeCliConfig, builtin_deployment
from .provider import ClaudeCliProvider, log
from .sessions import SessionStore

TABLE = "claude_cli"
CIRCUITS_TABLE = "claude_cli_circuits"
"""Where the circuits are kept in the host database (``ksi-host status`` in another process sees them; a restart keeps them)."""


class Pool(DeploymentPool[ClaudeCliProvider]):
    """The shared DeploymentPool, reporting the executable with each deployment too."""

    def __init__(self, members: Any, *, executable: str, **kw: Any) -> None:
        super().__init__(members, **kw)
        self.executable = executable

    def describe(self, m: ClaudeCliProvider) -> dict[str, Any]:
        return {**super().describe(m), "executable": self.executable}


def build_pool(config: ClaudeCliConfig, sessions: SessionStore | None, *, clock: Any) -> Pool:
    """The deployments of ``config`` in order, then the built-in one (if enabled)."""
    deployments = list(config.deployments) + ([builtin_deployment()] if config.builtin else [])
    return Pool(
        [ClaudeCliProvider(d, CircuitBreaker.from_config(config.circuit, clock=clock), executable=config.executable,
                           sessions=sessions, max_output_bytes=config.max_output_bytes) for d in deployments],
        priority=config.priority, executable=config.executable,
    )


class Plugin(ProviderPlugin):
    """One instance per Host; holds the deployments, their circuits and the session store (the hooks:
    :class:`ksi_host.providers.ProviderPlugin`)."""

    TABLE = TABLE
    CONFIG = ClaudeCliConfig
    CIRCUITS_TABLE = CIRCUITS_TABLE
    log = log

    def __init__(self) -> None:
        super().__init__()
        self.sessions: SessionStore | None = None

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        # the session store exists before the pool is built: its providers remember sessions in it
        self.sessions = SessionStore(host.db)
        await self.sessions.migrate()
        await super().ksi_startup(host)

    def build_pool(self, config: ClaudeCliConfig, host: Any) -> Pool:
        # before start-up (read-only use) there is no session store yet
        return build_pool(config, self.sessions, clock=host.clock)

    async def status(self, host: Any, pool: DeploymentPool[Any]) -> dict[str, Any]:
        assert isinstance(pool, Pool)
        return {TABLE: {
            "executable": pool.executable,
            "found": shutil.which(pool.executable),
            "priority": pool.priority,
            "sessions": await self.sessions.count() if self.sessions is not None else None,
            "circuits": pool.status(),
        }}
