"""The hooks every provider plugin implements the same way: :class:`ProviderPlugin`.

A provider plugin subclasses it, names its config table (``TABLE``), its
config class (``CONFIG``: a :class:`~ksi_host.providers.config.ProviderConfig`
subclass, with ``deployments``, ``circuit`` and ``priority``), the table that
keeps its circuits (``CIRCUITS_TABLE``) and its logger (``log``), and writes
:meth:`ProviderPlugin.build_pool` (its deployments as a
:class:`~ksi_host.providers.deployments.DeploymentPool` of its provider objects)::

    class Plugin(ProviderPlugin):
        TABLE = "myprov"
        CONFIG = MyConfig
        CIRCUITS_TABLE = "myprov_circuits"
        log = logging.getLogger("ksi_host.provider.myprov")

        def build_pool(self, config, host):
            return DeploymentPool([MyProvider(d, CircuitBreaker.from_config(config.circuit, clock=host.clock))
                                   for d in config.deployments], priority=config.priority)

The hookimpls live here (pluggy finds them on the subclass's instance):
``ksi_config_spec``; ``ksi_startup`` (builds the pool; when the host serves,
checks the deployments' keys (:func:`~ksi_host.providers.deployments.check_keys`:
a warning per deployment whose key variable is unset, StartupError when a
model has no deployment with its key); keeps the circuits in
``CIRCUITS_TABLE`` of the host database (a
:class:`~ksi_host.providers.circuit_store.CircuitStore`, ``self.circuits``);
then :meth:`start`); ``ksi_shutdown`` (writes pending circuit changes, then
:meth:`stop`);
``ksi_select_provider`` (:meth:`DeploymentPool.select
<ksi_host.providers.deployments.DeploymentPool.select>`: this plugin's own deployments only;
the host decides which plugin is asked first, by ``priority``); ``ksi_list_providers``;
``ksi_status`` (:meth:`status`, ``{"circuits": [...]}`` unless overridden).

Override the plain methods (:meth:`start`, :meth:`stop`, :meth:`status`,
:meth:`build_pool`), not the hookimpls: a method overriding a hookimpl must
be marked ``@hookimpl`` again or pluggy does not see it.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from ..hookspecs import hookimpl
from ..models import CompletionRequest, ProviderInfo
from .circuit_store import CircuitStore
from .deployments import DeploymentPool, check_keys


class ProviderPlugin:
    """Base class of a provider plugin's ``Plugin`` (one instance per Host)."""

    TABLE: ClassVar[str]
    """The config table, also the plugin's name in ProviderInfo and the ranking between plugins."""
    CONFIG: ClassVar[type]
    """The attrs class of the config table (its defaults are used before start-up when the table is absent)."""
    CIRCUITS_TABLE: ClassVar[str]
    """Where the circuits are kept in the host database (``ksi-host status`` in another process sees them)."""
    log: ClassVar[logging.Logger] = logging.getLogger("ksi_host.provider")
    """The plugin's logger (start-up warnings: a deployment's key variable unset)."""

    def __init__(self) -> None:
        self.pool: DeploymentPool[Any] | None = None
        self.circuits: CircuitStore | None = None

    # -- what a provider plugin writes ------------------------------------------------

    def build_pool(self, config: Any, host: Any) -> DeploymentPool[Any]:
        """The plugin's deployments, in try order, each with its circuit (``host.clock`` for the breakers)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_pool(config, host)")

    async def start(self, host: Any) -> None:
        """Called by ``ksi_startup`` after the pool is built and its circuits attached."""

    async def stop(self) -> None:
        """Called by ``ksi_shutdown`` after the circuits are written."""

    async def status(self, host: Any, pool: DeploymentPool[Any]) -> dict[str, Any]:
        """The plugin's ``ksi_status`` sections."""
        return {"circuits": pool.status()}

    # -- the hooks ----------------------------------------------------------------------

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return self.TABLE, self.CONFIG

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        self.pool = self.build_pool(host.config[self.TABLE], host)
        if host.serve:  # a read-only command (ksi-host status) calls nothing: it needs no key
            check_keys([m.deployment for m in self.pool.members], table=self.TABLE, log=self.log)
        self.circuits = CircuitStore(host.db, self.CIRCUITS_TABLE)
        await self.circuits.attach(self.pool)
        await self.start(host)

    @hookimpl
    async def ksi_shutdown(self) -> None:
        if self.circuits is not None:
            await self.circuits.detach()
        await self.stop()

    def _pool(self, host: Any) -> DeploymentPool[Any]:
        if self.pool is None:  # hooks called before start-up (tests calling hooks directly)
            self.pool = self.build_pool(host.config.get(self.TABLE) or self.CONFIG(), host)
        return self.pool

    @hookimpl
    def ksi_select_provider(self, host: Any, request: CompletionRequest, exclude: frozenset[str]) -> Any:
        return (self.pool or self._pool(host)).select(request.model, exclude)

    @hookimpl
    def ksi_list_providers(self, host: Any, model: str | None) -> list[ProviderInfo]:
        return self._pool(host).infos(model, self.TABLE)

    @hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any]:
        return await self.status(host, self._pool(host))


__all__ = ["ProviderPlugin"]
