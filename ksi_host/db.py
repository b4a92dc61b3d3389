"""The async SQLite helper: the one way any plugin touches SQLite.

One database file per host. Every connection is opened with
``journal_mode=WAL``, ``synchronous=NORMAL``, ``foreign_keys=ON`` and a busy
timeout, so readers never block the writer and a committed write survives a
killed process. The write-ahead log is copied into the database (a checkpoint,
with two fsyncs) every ``WAL_AUTOCHECKPOINT_PAGES`` pages instead of SQLite's
1,000: pages that every commit rewrites (the last page of each table and index)
are copied once per checkpoint, and the fsyncs are ten times rarer.

Writes are group-committed: :meth:`Database.execute` queues the statement and
returns a future that completes once the transaction holding it is committed.
Statements queued while a commit is in progress go into the next one, so many
concurrent writers share one commit. Each plugin keeps its own tables and migrates them with
:meth:`Database.migrate`, which records versions in ``ksi_schema_versions``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a database opens: `ksi-host --help` and `ksi-host plugins` never need them
    import sqlite3

    import aiosqlite

WAL_AUTOCHECKPOINT_PAGES = 10_000
"""Checkpoint after this many log pages (~40 MB with 4 KiB pages; the log file keeps that size).
Measured with the queue's and the ledger's statements: at 1,000 pages the checkpoints' fsyncs left
the writer idle for a quarter of its time (96 us of wall time per request against 70 us of CPU);
at 10,000, 66 us of both."""

DEFAULT_DB_ENV = "KSI_HOST_DB"
DEFAULT_DB_PATH = "ksi-host.db"
"""Used when neither ``--db`` nor ``KSI_HOST_DB`` is given: in the current directory."""

Statement = tuple[str, Any]
_MERGE, _MANY, _COUNT = 0, 1, 2  # how a writer's statements run: merged with others', one executemany, counted alone
_Pending = tuple[list[Statement], int, 'asyncio.Future[Any]']


def default_db_path() -> str:
    return os.environ.get(DEFAULT_DB_ENV) or DEFAULT_DB_PATH


class Database:
    """An aiosqlite connection with WAL, migrations and group commit.

    ``async with Database(path) as db:`` or ``await db.open()`` / ``await db.close()``.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000) -> None:
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.commits = 0  # transactions committed by the group writer (for tests and benchmarks)

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("database is not open")
        return self._conn

    async def open(self) -> Database:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        import sqlite3

        import aiosqlite

        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS ksi_schema_versions ("
            " owner TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at REAL NOT NULL)"
        )
        self._conn = conn
        return self

    async def close(self) -> None:
        if self._conn is None:
            return
        await self.flush()
        await self._conn.close()
        self._conn = None

    # -- schema -------------------------------------------------------------

    async def migrate(self, owner: str, migrations: Sequence[str]) -> int:
        """Bring ``owner``'s tables to version ``len(migrations)``.

        ``migrations[i]`` is the SQL script that takes the schema from version
        ``i`` to ``i + 1``; scripts already applied (recorded in
        ``ksi_schema_versions``) are skipped. Each script runs in its own
        transaction with foreign keys off, so a script may rebuild a table that
        others reference (SQLite's way of changing a constraint: create the new
        table, copy the rows, drop the old one, rename the new one); before it
        commits, ``PRAGMA foreign_key_check`` must find nothing, or the script
        is rolled back and RuntimeError names it. Never edit a released
        migration: append a new one. Returns the version now in force.
        """
        async with self._lock:
            rows = await self.conn.execute_fetchall("SELECT version FROM ksi_schema_versions WHERE owner = ?", (owner,))
            current = rows[0][0] if rows else 0
            if current > len(migrations):
                raise RuntimeError(f"{owner}: database schema version {current} is newer than this code knows ({len(migrations)})")
            todo = [(v, migrations[v - 1].strip().rstrip(";")) for v in range(current + 1, len(migrations) + 1)]
            if todo:
                await self._on_thread(_migrate_sync, owner, todo)
            return len(migrations)

    async def schema_version(self, owner: str) -> int:
        row = await self.fetchone("SELECT version FROM ksi_schema_versions WHERE owner = ?", (owner,))
        return row[0] if row else 0

    # -- writes (group commit) ----------------------------------------------

    def _queue(self, statements: list[Statement], mode: int) -> asyncio.Future[Any]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((statements, mode, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())
        return fut

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> asyncio.Future[None]:
        """Queue one write statement; ``await`` the answer to know it is committed.

        Not a coroutine: the statement is queued at the call (awaited or not),
        and the future it returns completes once its transaction is committed
        (or holds the statement's error). A hookimpl may return it as is."""
        return self._queue([(sql, params)], _MERGE)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> asyncio.Future[None]:
        """Queue one write statement for each parameter set; the future completes once committed."""
        return self._queue([(sql, list(seq))], _MANY)

    def write_batch(self, statements: Sequence[Statement], *, count: bool = False) -> asyncio.Future[Any]:
        """Queue several write statements to commit atomically (all or none); the future completes once committed.

        With ``count=True`` its answer is the number of rows these statements inserted, updated
        or deleted (SQLite's ``total_changes`` across them; a row an ``ON CONFLICT DO NOTHING``
        skipped does not count), else None."""
        return self._queue(list(statements), _COUNT if count else _MERGE)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush_loop(self) -> None:
        await asyncio.sleep(0)  # let writers of this loop iteration join the batch
        while self._pending:
            batch, self._pending = self._pending, []
            async with self._lock:
                try:
                    await self._commit(batch)
                except Exception as e:  # sqlite3.Error, or a value sqlite3 cannot bind (UnicodeEncodeError,
                    # OverflowError, ...): the writer gets it; nobody may wait forever for a flusher that died
                    if len(batch) == 1:
                        batch[0][2].set_exception(e)
                        continue
                    for item in batch:  # find the failing writer; the others commit alone
                        try:
                            await self._commit([item])
                        except Exception as e:
                            if not item[2].done():
                                item[2].set_exception(e)

    async def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for the whole batch, run in one hop on the connection's thread."""
        counts = await self._on_thread(_commit_sync, [(statements, mode) for statements, mode, _ in batch])
        self.commits += 1
        for (_, _, fut), n in zip(batch, counts, strict=True):
            if not fut.done():
                fut.set_result(n)

    async def _on_thread(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(sqlite3_connection, *args)`` on the connection's thread: one round trip,
        however many statements ``fn`` runs. (aiosqlite has no public call for this; its
        ``_execute`` queues a function for its thread, and ``_conn`` is its sqlite3 connection.)"""
        conn = self.conn
        return await conn._execute(lambda: fn(conn._conn, *args))

    # -- reads ----------------------------------------------------------------

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a query; return all rows (``sqlite3.Row``: index or name)."""
        return list(await self.conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self.conn.execute_fetchall(sql, params)
        return rows[0] if rows else None

    async def pragma(self, name: str) -> Any:
        row = await self.fetchone(f"PRAGMA {name}")
        return row[0] if row else None


def _commit_sync(conn: sqlite3.Connection, work: list[tuple[list[Statement], int]]) -> list[int | None]:
    """``BEGIN IMMEDIATE``, every statement, ``COMMIT`` (``ROLLBACK`` and re-raise on error).

    Consecutive statements with the same SQL go through one ``executemany``, across writers,
    except a counted writer's (``write_batch(count=True)``), which run on their own. Returns, for
    each writer, the rows its statements changed if it asked, else None."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        counts: list[int | None] = []
        merged: list[Statement] = []  # statements of merging writers, run at the next other writer or the end
        for statements, mode in work:
            if mode == _MERGE:
                merged += statements
                counts.append(None)
                continue
            _run_grouped(conn, merged)
            merged = []
            if mode == _MANY:
                conn.executemany(*statements[0])
                counts.append(None)
            else:
                before = conn.total_changes
                _run_grouped(conn, statements)
                counts.append(conn.total_changes - before)
        _run_grouped(conn, merged)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return counts


def _run_grouped(conn: sqlite3.Connection, statements: list[Statement]) -> None:
    """Run ``statements`` in order, each run of consecutive same-SQL statements as one ``executemany``."""
    if len(statements) == 1:
        conn.execute(*statements[0])
        return
    sql: str | None = None
    params: list[Any] = []
    for st_sql, st_params in statements:
        if st_sql != sql:
            if params:
                conn.executemany(sql, params)  # type: ignore[arg-type]
            sql, params = st_sql, []
        params.append(st_params)
    if params:
        conn.executemany(sql, params)  # type: ignore[arg-type]


def _migrate_sync(conn: sqlite3.Connection, owner: str, scripts: list[tuple[int, str]]) -> None:
    """Run each ``(version, script)`` in its own transaction, foreign keys off (see :meth:`Database.migrate`)."""
    conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set before BEGIN
    try:
        for version, script in scripts:
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{script};\n")  # leaves the transaction open
                conn.execute(
                    "INSERT INTO ksi_schema_versions(owner, version, applied_at) VALUES (?, ?, ?) ON CONFLICT(owner)"
                    " DO UPDATE SET version = excluded.version, applied_at = excluded.applied_at", (owner, version, time.time()))
                dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
                if dangling:
                    table, rowid, parent, _ = dangling[0]
                    raise RuntimeError(f"{owner}: migration {version} leaves {len(dangling)} row(s) whose foreign key points "
                                       f"nowhere (first: {table} row {rowid} -> {parent}); rolled back")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
