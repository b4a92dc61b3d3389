"""Circuits kept in the host database: :class:`CircuitStore`.

A provider plugin's circuits live in memory (one
:class:`~ksi_host.providers.circuit.CircuitBreaker` per deployment). The store
keeps a copy in a table of the host database, so ``ksi-host status`` in another
process shows the circuits of the running host, and a restarted host does not
hammer a deployment it knew was down. :class:`~ksi_host.providers.plugin.ProviderPlugin`
uses one (table ``CIRCUITS_TABLE``); a plugin that does not subclass it can too::

    store = CircuitStore(host.db, "myprov_circuits")
    await store.attach(pool)        # in ksi_startup: restore, then write every change
    ...
    await store.detach()            # in ksi_shutdown: write what is pending, stop

Only names, states, counts and (redacted) error messages are stored, never a key.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from .deployments import DeploymentPool

MIGRATION = (
    "CREATE TABLE {table} ("
    " name TEXT PRIMARY KEY,"
    " model TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " failures INTEGER NOT NULL,"
    " opens_until REAL,"  # unix seconds when an open circuit allows its trial call; NULL unless open
    " opens INTEGER NOT NULL,"
    " last_error TEXT,"
    " updated_at REAL NOT NULL)"
)


class CircuitStore:
    """The circuits of one :class:`~ksi_host.providers.deployments.DeploymentPool`, kept in ``table`` of ``db``.

    ``db`` is a :class:`ksi_host.db.Database` (``host.db``); ``table`` an SQL
    identifier, created by the migrations owned by ``table``.
    """

    def __init__(self, db: Any, table: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"table must be an SQL identifier, got {table!r}")
        self.db: Any = db
        self.table = table
        self.pool: DeploymentPool[Any] | None = None
        self._dirty: dict[str, Any] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def attach(self, pool: DeploymentPool[Any]) -> None:
        """Restore ``pool``'s saved circuits, then write every later change in the background.

        Creates the table if needed; each configured deployment's saved circuit is
        restored (an open circuit keeps the rest of its cool-down, in wall-clock
        time: ``pool.wall_clock``); rows of deployments no longer configured are
        left alone. :meth:`flush` waits for the writes.
        """
        t = self.table
        await self.db.migrate(t, [MIGRATION.format(table=t)])
        rows = await self.db.fetchall(f"SELECT name, state, failures, opens_until, opens, last_error FROM {t}")
        now = pool.wall_clock()
        for name, state, failures, opens_until, opens, last_error in rows:
            m = pool.get(name)
            if m is not None:
                left = max(0.0, opens_until - now) if opens_until is not None else 0.0
                m.breaker.restore(state=state, failures=failures, cooldown_left=left, opens=opens, last_error=last_error)
        self.pool = pool
        for m in pool.members:
            m.breaker.on_change = lambda _b, m=m: self._mark(m)

    def _mark(self, m: Any) -> None:
        self._dirty[m.deployment.name] = m
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_dirty())

    async def _flush_dirty(self) -> None:
        while self._dirty and self.pool is not None:
            batch = list(self._dirty.values())
            self._dirty.clear()
            now = self.pool.wall_clock()
            rows = []
            for m in batch:
                b = m.breaker
                left = b.cooldown_left()
                state = "closed" if b.state == "closed" else "open"  # half-open is open with its cool-down over
                rows.append((m.deployment.name, m.deployment.model, state, b.failures,
                             now + left if state == "open" else None, b.opens, b.last_error, now))
            await self.db.executemany(
                f"INSERT INTO {self.table} (name, model, state, failures, opens_until, opens, last_error, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET model = excluded.model,"
                " state = excluded.state, failures = excluded.failures, opens_until = excluded.opens_until,"
                " opens = excluded.opens, last_error = excluded.last_error, updated_at = excluded.updated_at",
                rows,
            )

    async def flush(self) -> None:
        """Wait until every circuit change so far is written."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._dirty and self.pool is not None:
            await self._flush_dirty()

    async def detach(self) -> None:
        """Write pending changes and stop persisting (call before the database closes)."""
        await self.flush()
        if self.pool is not None:
            for m in self.pool.members:
                m.breaker.on_change = None
        self.pool = None


__all__ = ["CircuitStore"]
