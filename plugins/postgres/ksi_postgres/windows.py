"""The rate windows of ksi-limits shared by every host on the database: :class:`PgWindowStore`.

Offered through ``ksi_window_store`` when ``[postgres]`` is configured; it implements
:class:`ksi_host.windows.WindowStore` (see there for what a window counts and why) over two tables
(``ksi_postgres.schema.WINDOWS_MIGRATION``): ``ksi_pg_windows``, one row per window key (rule index, name), and
``ksi_pg_window_leases``, one row per lease and key: one request, its ``tokens`` (the reservation, trued up
when the call ends), the host that took it, ``started_at`` (reserved) and ``ended_at`` (NULL while in flight).
A window counts the rows of its key that are in flight or ended less than ``window_s`` ago.

* ``take`` is one call of ``ksi_pg_window_take`` (one round trip, one transaction): it inserts the keys'
  rows it has not seen (``ON CONFLICT DO NOTHING``), locks them in (rule, name) order (``SELECT ... FOR
  UPDATE``: two hosts taking the same keys take turns, and cannot deadlock), ends the leases in flight of
  hosts that are gone, sums what each window counts, and inserts the leases only if every key has room; else
  it answers, per key lacking room, in how many seconds the rows sliding out will have made it (NULL: only
  calls in flight ending can).
* The sum: each key's row keeps ``tokens`` and ``requests`` of its *counted* leases (ended ones that a take
  folded in, under the key's lock); a take folds in the leases that ended since the last one, deletes (and
  subtracts) those that slid out, and adds the ones not counted (in flight). So a take touches the rows that
  changed since the last take, not every row of the window: summing every row, admissions fell from 958 to
  667 a second between 1,600 and 4,800 rows in the window; with the kept sums they stay flat to 24,000 rows
  (see the README).
* ``settle`` ends the lease's rows now (``tokens`` as reported, or the reservation); ``release`` deletes them.
* Times are the database's clock (``ksi_pg_now()``): a host's ``host.clock`` is monotonic and its own, so a
  refusal's delay is given back as ``now + delay`` on the caller's clock.
* A host that is gone (stopped, or its heartbeat older than its ``lease_s``: ksi-postgres's test of dead hosts,
  as for the ledger's calls) cannot settle its leases: ``take`` (for its keys) and ``snapshot`` (for all) end
  its leases in flight at that moment, as calls of unknown outcome (the reservation stays counted for
  ``window_s``): a killed host holds its concurrency slots at most ``lease_s`` after its last heartbeat. A
  process that does not serve (``ksi-host status``) registers no host; leases it took are never found gone.
* ``shared``: the windows outlive a process, so ksi-limits counts nothing from the ledger into them;
  ``poll_s``: room freed on another host wakes no waiter here, so waiters look again that often.

The order of waiters (FIFO per window) is kept by each host among its own attempts; between hosts, whoever
takes first when there is room goes first.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from ksi_host.errors import DatabaseError
from ksi_host.windows import Claim, Key, Refusal, WindowState

from .schema import HOST_GONE

if TYPE_CHECKING:
    from .db import Pg


TAKE = "SELECT o_rule, o_name, o_retry_in FROM ksi_pg_window_take($1, $2, $3, $4, $5, $6, $7, $8, $9)"
SETTLE = (
    "UPDATE ksi_pg_window_leases SET ended_at = ksi_pg_now(), tokens = coalesce($3, tokens)"
    " WHERE host_id = $1 AND lease = $2 AND ended_at IS NULL RETURNING rule, name"
)
RELEASE = "DELETE FROM ksi_pg_window_leases WHERE host_id = $1 AND lease = $2 AND ended_at IS NULL RETURNING rule, name"
END_GONE_HOSTS = f"""
UPDATE ksi_pg_window_leases l SET ended_at = ksi_pg_now() FROM ksi_pg_hosts h
WHERE l.ended_at IS NULL AND NOT l.counted AND h.host_id = l.host_id AND {HOST_GONE}
"""
"""The leases in flight of hosts that are gone end now (as in ``ksi_pg_window_take``, for every key)."""
SNAPSHOT = """
SELECT w.rule, w.name, count(l.id) AS requests, coalesce(sum(l.tokens), 0) AS tokens,
       count(l.id) FILTER (WHERE l.ended_at IS NULL) AS in_flight
FROM ksi_pg_windows w
LEFT JOIN ksi_pg_window_leases l ON l.rule = w.rule AND l.name = w.name
    AND (l.ended_at IS NULL OR l.ended_at > ksi_pg_now() - w.window_s)
GROUP BY w.rule, w.name
"""

TRIES = 5
"""How often a statement ended as a deadlock victim is tried again (keys are locked in one order, so only a
settle racing a take that ends a gone host's leases can meet one)."""


class PgWindowStore:
    """The windows of every host on one database (see the module docstring). It answers calls once bound
    (:meth:`bind`, at ksi-postgres's start-up); ksi-limits may hold it before then."""

    shared = True

    def __init__(self, poll_s: float) -> None:
        self.poll_s: float | None = poll_s
        self.pg: Pg | None = None
        self.host_id = ""
        self.closed = False

    def bind(self, pg: Pg, host_id: str | None) -> None:
        """Use ``pg`` for the leases of ``host_id`` (the host's row in ksi_pg_hosts; None: a process that does not
        serve, whose leases get an id of their own)."""
        self.pg = pg
        self.host_id = host_id or f"unregistered-{uuid.uuid4().hex}"

    def close(self) -> None:
        """ksi-postgres stopped: what comes later (a call cut short reporting its end) fails as the database would."""
        self.closed = True

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        if self.closed:
            raise DatabaseError(self.pg.name if self.pg else "postgres",
                                "ksi-postgres has stopped: the shared rate windows are closed")
        if self.pg is None:
            raise RuntimeError("PgWindowStore used before ksi-postgres started (ksi_startup binds it)")
        for attempt in range(TRIES):
            try:
                return await self.pg.fetch(sql, *args)
            except DatabaseError as e:
                import asyncpg

                if attempt == TRIES - 1 or not isinstance(e.__cause__, asyncpg.DeadlockDetectedError):
                    raise
        raise AssertionError("unreachable")

    async def take(self, lease: Hashable, claims: Sequence[Claim], now: float) -> Refusal | None:
        rows = await self._fetch(
            TAKE, self.host_id, repr(lease), [c.key[0] for c in claims], [c.key[1] for c in claims],
            [c.limit.window_s for c in claims], [c.limit.rpm for c in claims], [c.limit.tpm for c in claims],
            [c.limit.concurrency for c in claims], [c.tokens for c in claims])
        if not rows:
            return None
        delays = [r["o_retry_in"] for r in rows]
        retry_at = None if None in delays else now + max(0.0, max(delays))
        return Refusal(tuple((r["o_rule"], r["o_name"]) for r in rows), retry_at)

    async def settle(self, lease: Hashable, tokens: int | None, now: float) -> tuple[Key, ...]:
        return tuple((r["rule"], r["name"]) for r in await self._fetch(SETTLE, self.host_id, repr(lease), tokens))

    async def release(self, lease: Hashable, now: float) -> tuple[Key, ...]:
        return tuple((r["rule"], r["name"]) for r in await self._fetch(RELEASE, self.host_id, repr(lease)))

    def seed(self, key: Key, limit: Any, requests: int, tokens: int, now: float) -> None:
        """Nothing to seed: the windows outlive every process (``shared``)."""

    async def snapshot(self, now: float) -> dict[Key, WindowState]:
        await self._fetch(END_GONE_HOSTS)
        return {(r["rule"], r["name"]): WindowState(r["requests"], r["tokens"], r["in_flight"])
                for r in await self._fetch(SNAPSHOT)}
