"""The connection to PostgreSQL: a pool of asyncpg connections, migrations, batched statements.

asyncpg was chosen over psycopg 3 by measurement on this plugin's hot statements (see the README):
it binds arrays in binary and keeps prepared statements per connection.

Failures of the database itself (it cannot be reached, the connection broke, it is shutting down, out of
disk) become :class:`~ksi_host.errors.DatabaseError` naming the database (never the DSN: it may hold a
password); a statement that is wrong (a constraint it breaks, bad SQL) raises asyncpg's own exception: a
programming error.

:class:`Batcher` is the group commit: the items handed to it while its previous statement runs go
together into the next one (one transaction, arrays bound with ``unnest``), each caller getting its own
answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ksi_host.errors import DatabaseError, DatabaseStartupError

from . import schema

log = logging.getLogger("ksi_host.postgres")

BATCH_MAX = 500
"""Items per batched statement at most (a NOTIFY payload of seqs stays well under 8,000 bytes)."""


def describe(dsn: str) -> str:
    """The DSN as it may be printed: user, host, port and database, never a password."""
    if "://" not in dsn and "=" not in dsn:  # neither a URL nor key=value pairs: it could be anything, a password too
        return "(the DSN in dsn_env: not a postgresql:// URL)"
    text = re.sub(r"(://[^:/@]*):.*@", r"\1:***@", dsn)  # to the last '@': a password may hold one unescaped
    return re.sub(r"(password=)\S+", r"\1***", text)


def _operational(e: BaseException) -> bool:
    """Does ``e`` say the database cannot do its job (rather than that a statement is wrong)?"""
    import asyncpg

    if isinstance(e, (OSError, asyncio.TimeoutError, asyncpg.exceptions.InterfaceError,
                      asyncpg.exceptions.ConnectionDoesNotExistError)):
        return True
    if isinstance(e, asyncpg.PostgresError):
        code = getattr(e, "sqlstate", "") or ""
        # 08 connection, 53 resources (disk full, too many connections), 57 operator intervention (shut down,
        # cancelled), 58 system error, 28 bad credentials, 3D no such database, 40 serialization / deadlock
        return code[:2] in ("08", "53", "57", "58", "28", "3D", "40")
    return False


async def _no_reset(con: Any) -> None:
    """asyncpg resets a connection (RESET ALL, UNLISTEN, ...) each time it goes back to the pool: one more round
    trip per statement. Nothing here leaves session state behind (transactions end, locks are transaction
    locks, LISTEN has its own connection), so nothing is reset."""


class Pg:
    """A pool of connections to one database. ``name`` is how messages name it (no password)."""

    def __init__(self, dsn: str, *, size: int = 6) -> None:
        self.dsn = dsn
        self.name = describe(dsn)
        self.size = size
        self.pool: Any = None

    def error(self, e: BaseException, starting: bool = False) -> DatabaseError:
        problem = f"{type(e).__name__}: {e}".replace(self.dsn, self.name)
        return (DatabaseStartupError if starting else DatabaseError)(f"postgres {self.name}", problem)

    async def open(self) -> Pg:
        import asyncpg

        try:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.size, timeout=30,
                                                  command_timeout=None, statement_cache_size=256, reset=_no_reset)
        except Exception as e:
            if _operational(e) or isinstance(e, (ValueError, OverflowError, asyncpg.PostgresError)):  # Overflow: a port > 65535
                raise self.error(e, starting=True) from None
            raise
        return self

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except Exception:  # a broken pool is closed hard: nothing of ours is left in it
                pool.terminate()

    async def run(self, fn: Callable[[Any], Awaitable[Any]], *, starting: bool = False) -> Any:
        """``await fn(connection)`` on a pooled connection; database failures become DatabaseError."""
        try:
            async with self.pool.acquire() as con:
                return await fn(con)
        except Exception as e:
            if _operational(e):
                raise self.error(e, starting) from e
            raise

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self.run(lambda con: con.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self.run(lambda con: con.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.run(lambda con: con.fetchval(sql, *args))

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.run(lambda con: con.execute(sql, *args))

    async def transaction(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """``await fn(connection)`` inside one transaction, tried again (up to 5 times) when PostgreSQL ends it
        as a deadlock victim (two batches that wait on each other's rows and session locks)."""
        import asyncpg

        async def run(con: Any) -> Any:
            async with con.transaction():
                return await fn(con)
        for attempt in range(5):
            try:
                return await self.run(run)
            except DatabaseError as e:
                cause = e.__cause__
                if attempt == 4 or not isinstance(cause, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
                    raise
                log.info("ksi-postgres: %s; trying again", cause)
        raise AssertionError("unreachable")

    async def migrate(self, owner: str, migrations: Sequence[str]) -> int:
        """Apply the migrations of ``owner`` not applied yet, under an advisory lock; the version reached.
        A database newer than ``migrations`` stops the start (DatabaseStartupError)."""
        async def apply(con: Any) -> int:
            async with con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", schema.MIGRATE_LOCK)
                await con.execute("CREATE TABLE IF NOT EXISTS ksi_pg_schema_versions"
                                  " (owner text PRIMARY KEY, version integer NOT NULL)")
                version = await con.fetchval("SELECT version FROM ksi_pg_schema_versions WHERE owner = $1", owner) or 0
                if version > len(migrations):
                    raise DatabaseStartupError(f"postgres {self.name}", f"its {owner} tables are at version {version}, "
                                               f"newer than this code knows ({len(migrations)}): upgrade {owner}")
                for number in range(version + 1, len(migrations) + 1):
                    await con.execute(migrations[number - 1])
                    log.info("%s: migration %d applied to %s", owner, number, self.name)
                await con.execute("INSERT INTO ksi_pg_schema_versions (owner, version) VALUES ($1, $2)"
                                  " ON CONFLICT (owner) DO UPDATE SET version = excluded.version", owner, len(migrations))
                return len(migrations)
        return await self.run(apply, starting=True)


class Batcher:
    """Group commit for one statement: ``await batcher.add(item)`` gives ``flush(items)[i]`` for its item.

    ``flush(items)`` runs one batched statement (one transaction) and returns one answer per item. While
    it runs, new items wait for the next batch, so under load each statement carries many items; alone,
    an item goes at once (in the next turn of the event loop)."""

    def __init__(self, flush: Callable[[list[Any]], Awaitable[Sequence[Any]]]) -> None:
        self.flush = flush
        self.items: list[Any] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.task: asyncio.Task[None] | None = None
        self.batches = 0

    def add(self, item: Any) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        self.items.append(item)
        self.futures.append(fut)
        if self.task is None:
            self.task = asyncio.ensure_future(self._loop())
        return fut

    async def _loop(self) -> None:
        try:
            while self.items:
                items, futures = self.items[:BATCH_MAX], self.futures[:BATCH_MAX]
                del self.items[:BATCH_MAX], self.futures[:BATCH_MAX]
                self.batches += 1
                try:
                    answers = await self.flush(items)
                except BaseException as exc:  # every waiter gets it, none is dropped
                    for f in futures:
                        if not f.done():
                            f.set_exception(exc)
                            if isinstance(exc, DatabaseError):
                                f.exception()  # retrieved here too: a waiter that went away logs nothing
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for f, answer in zip(futures, answers, strict=True):
                    if not f.done():
                        f.set_result(answer)
        finally:
            self.task = None

    async def drain(self) -> None:
        while self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


def columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows of ``width`` values as ``width`` arrays (one per column), for ``unnest``."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(c) for c in zip(*rows, strict=True)]
