"""The async SQLite helper: the one way any plugin touches SQLite.

One database file per host, two connections to it, each with one job:

* the **writer** commits every write, on the event loop's own thread. Writes are
  group-committed: :meth:`Database.execute` queues the statement and returns a future
  that completes once the transaction holding it is committed; every statement queued
  in one turn of the event loop goes into one transaction, run at the end of that turn.
* the **reader** runs on the helper's own thread (a one-worker ``concurrent.futures``
  executor): queries, migrations, and the checkpoints that copy the write-ahead log into
  the database file.

Both are opened with ``journal_mode=WAL``, ``synchronous=NORMAL``, ``foreign_keys=ON`` and
a busy timeout, so readers never block the writer and a committed write survives a killed
process. A commit then writes to the log and syncs nothing; what syncs (twice) is the
checkpoint that copies the log into the file. SQLite's own (``wal_autocheckpoint``, off on
both connections here) runs inside a commit, and held every other commit for tens of
milliseconds; here, after every ``CHECKPOINT_AFTER_ROWS`` rows written, the reader's thread
copies the bulk while commits go on, and the writer then copies the few pages committed
meanwhile (see :meth:`Database._run_checkpoint`).

Why the writer runs on the loop's thread: a commit in WAL mode without a sync costs tens of
microseconds, less than the trip to another thread and back it would need (two thread
wake-ups, and the GIL handed over twice). Measured with ``ksi-host serve`` at 400
requests/s (four commits per request), added latency p50 2.1 -> 1.3 ms. The price: a commit
that must wait for the write lock holds the loop while it waits (SQLite's busy handler sleeps 1 ms,
then longer; at most the busy timeout). Other processes write a served database only briefly: a
``ksi-host cancel`` or ``clear-session`` leaving its command row for the serving host, a second host
finding the database taken. An in-memory database (``":memory:"``) is one connection, and everything runs
on the loop's thread.

Each plugin keeps its own tables and migrates them with :meth:`Database.migrate`, which
records versions in ``ksi_schema_versions``.

A database that cannot do its job (it cannot be opened, is not a database, is
read-only, damaged or full, or stays locked past the busy timeout) raises
:class:`~ksi_host.errors.DatabaseError` naming the file, with SQLite's own
words; while opening or migrating, :class:`~ksi_host.errors.DatabaseStartupError`.
A wrong statement (bad SQL, a constraint it breaks) raises SQLite's own
exception: that is a programming error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DatabaseError, DatabaseStartupError

if TYPE_CHECKING:  # imported on the database thread: `ksi-host --help` and `ksi-host plugins` never need it
    import sqlite3

log = logging.getLogger("ksi_host.db")

CHECKPOINT_AFTER_ROWS = 1_000
CHECKPOINT_MIN_INTERVAL_S = 0.25
"""Checkpoint once the writer has inserted, updated or deleted ``CHECKPOINT_AFTER_ROWS`` rows since the last
one began, and not sooner than ``CHECKPOINT_MIN_INTERVAL_S`` after it. Each checkpoint ends with the writer's
own short one on the loop's thread (2 to 3 ms measured under ksi-host serve's load, mostly two syncs), and
copies what the log gathered meanwhile while commits go on, competing with them for the disk. Measured with
``ksi-host serve`` at 500 requests/s (about 6 rows and 18 log pages per request), added latency p99: 5.1 to
9.7 ms after every 1,000 rows, 7.9 to 10.7 ms after 5,000, 13.6 to 28 ms after 20,000. The interval bounds
how often the writer pays its part when many requests share each commit (benchmarks/host_only.py writes
35,000 rows a second: four checkpoints a second instead of 35)."""

DEFAULT_DB_ENV = "KSI_HOST_DB"
DEFAULT_DB_PATH = "ksi-host.db"
"""Used when neither ``--db`` nor ``KSI_HOST_DB`` is given: in the current directory."""

Statement = tuple[str, Any]
_MERGE, _MANY, _COUNT = 0, 1, 2  # how a writer's statements run: merged with others', one executemany, counted alone
_Pending = tuple[list[Statement], int, 'asyncio.Future[Any]']


def default_db_path() -> str:
    return os.environ.get(DEFAULT_DB_ENV) or DEFAULT_DB_PATH


_OPERATIONAL = frozenset({"PERM", "BUSY", "LOCKED", "NOMEM", "READONLY", "IOERR", "CORRUPT", "FULL", "CANTOPEN",
                          "PROTOCOL", "NOTADB"})
"""SQLite's primary result codes (``SQLITE_<name>``) of a database that cannot do its job, as opposed
to a statement that is wrong (``ERROR``, ``CONSTRAINT``, ``MISMATCH``, ``RANGE``, ``MISUSE``)."""

_HINTS = {
    "CANTOPEN": " (does its folder exist, and may this user write there?)",
    "READONLY": " (the file or its folder is read-only for this user)",
    "CORRUPT": " (the file is damaged)",
}


def _problem(e: BaseException) -> str | None:
    """What is wrong with the database, in SQLite's words, if ``e`` says the database cannot do its
    job; None for any other exception (a wrong statement, a value SQLite cannot bind, a bug)."""
    name = getattr(e, "sqlite_errorname", None)  # set on sqlite3.Error (Python >= 3.11)
    if not isinstance(name, str) or name.count("_") < 1:
        return None
    primary = name.split("_")[1]
    if primary not in _OPERATIONAL:
        return None
    return f"{e}{_HINTS.get(primary, '')}"


class Database:
    """A SQLite database with WAL, migrations and group commit: see the module docstring.

    ``async with Database(path) as db:`` or ``await db.open()`` / ``await db.close()``.
    With ``create=False`` a missing file is not created: :meth:`open` raises
    DatabaseStartupError naming it (for hosts that only read and edit an existing database).
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 10_000, create: bool = True) -> None:
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.create = create
        self._memory = self.path == ":memory:"
        self._executor: ThreadPoolExecutor | None = None
        self._reader: sqlite3.Connection | None = None  # used only on the executor's thread
        self._writer: sqlite3.Connection | None = None  # used only on the event loop's thread, once open
        self._pending: list[_Pending] = []
        self._committed: asyncio.Future[None] | None = None  # set while a commit is scheduled: done once it ran
        self._checkpoint: asyncio.Future[None] | None = None
        self._rows_at_checkpoint = 0  # the writer's total_changes when the last checkpoint was asked for
        self._checkpoint_at = 0.0  # time.monotonic() then
        self.commits = 0  # transactions committed by the group writer (for tests and benchmarks)
        self.checkpoints = 0  # checkpoints run on the reader's thread (for tests and benchmarks)

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> Database:
        if not self._memory and not self.create and not Path(self.path).exists():
            raise DatabaseStartupError(self.path, "no such file (only a serving host, such as `ksi-host run`, creates "
                                                  "one; check --db or $KSI_HOST_DB)")
        if not self._memory and self.create:
            folder = Path(self.path).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatabaseStartupError(self.path, f"cannot create its folder {folder}: {e.strerror}") from e
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ksi-db")
        try:  # both opened on the database thread: opening may wait for a lock
            self._reader = await self._run(_connect, self.path, self.create, self.busy_timeout_ms, starting=True)
            self._writer = self._reader if self._memory else await self._run(
                _connect, self.path, False, self.busy_timeout_ms, starting=True)
        except BaseException:  # no thread may outlive a database that did not open
            if self._reader is not None:
                await self._run(_close, self._reader)
            self._executor.shutdown(wait=True)  # (it is idle: the call that failed has returned)
            self._executor = self._reader = None
            raise
        self._rows_at_checkpoint = self._writer.total_changes
        log.debug("database %s open", self.path)
        return self

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self.flush()
            if self._checkpoint is not None:
                await self._checkpoint
        finally:
            try:
                if self._writer is not None and self._writer is not self._reader:
                    self._writer.close()
                if self._reader is not None:  # the last connection to close checkpoints the log into the file
                    await self._run(_close, self._reader)
            finally:
                self._executor.shutdown(wait=True)  # (it is idle: the connections are closed)
                self._executor = self._reader = self._writer = None
                log.debug("database %s closed", self.path)

    async def _run(self, fn: Any, *args: Any, starting: bool = False) -> Any:
        """``fn(*args)`` on the database thread (an in-memory database's open: on this one): one hop there and
        back. A failure of the database itself becomes DatabaseError (DatabaseStartupError when ``starting``);
        anything else is raised as is."""
        if self._executor is None:
            raise RuntimeError(f"database {self.path} is not open")
        try:
            if self._memory and self._writer is not None:
                return fn(*args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except Exception as e:
            self._raise_failure(e, starting)
            raise

    def _on_writer(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` here, on the event loop's thread (the writer's); failures as :meth:`_run` raises them."""
        try:
            return fn(*args)
        except Exception as e:
            self._raise_failure(e)
            raise

    def _raise_failure(self, e: Exception, starting: bool = False) -> None:
        """Raise DatabaseError (DatabaseStartupError when ``starting``) from ``e`` if ``e`` says the database
        cannot do its job; return if it does not (the caller raises ``e`` as is)."""
        problem = _problem(e)
        if problem is not None:
            raise (DatabaseStartupError if starting else DatabaseError)(self.path, problem) from e

    # -- schema -------------------------------------------------------------

    async def migrate(self, owner: str, migrations: Sequence[str]) -> int:
        """Bring ``owner``'s tables to version ``len(migrations)``.

        ``migrations[i]`` is the SQL script that takes the schema from version
        ``i`` to ``i + 1``; scripts already applied (recorded in
        ``ksi_schema_versions``) are skipped. Each script runs in its own write
        transaction (``BEGIN IMMEDIATE``), which first reads the version again:
        several processes starting together on one database apply each script
        once. A script runs with foreign keys off, so it may rebuild a table that
        others reference (SQLite's way of changing a constraint: create the new
        table, copy the rows, drop the old one, rename the new one); before it
        commits, ``PRAGMA foreign_key_check`` must find nothing, or the script
        is rolled back and RuntimeError names it. A database whose version is
        newer than ``len(migrations)`` raises DatabaseStartupError. Never edit a
        released migration: append a new one. Returns the version now in force.
        """
        await self.flush()  # (the writer's rows go first: a script may read them)
        found = await self._run(_migrate_sync, self._reader, owner, list(migrations), starting=True)
        if found > len(migrations):
            raise DatabaseStartupError(self.path, f"the tables of {owner} are at schema version {found}, newer than "
                                                  f"this code knows ({len(migrations)}): was it written by a newer {owner}?")
        return len(migrations)

    async def schema_version(self, owner: str) -> int:
        row = await self.fetchone("SELECT version FROM ksi_schema_versions WHERE owner = ?", (owner,))
        return row[0] if row else 0

    # -- writes (group commit) ----------------------------------------------

    def _queue(self, statements: list[Statement], mode: int) -> asyncio.Future[Any]:
        if self._writer is None:
            raise RuntimeError(f"database {self.path} is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((statements, mode, fut))
        if self._committed is None:  # the first writer of this turn of the loop: commit at its end
            self._committed = loop.create_future()
            loop.call_soon(self._commit_pending)
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
        skipped does not count), else None. A conditional statement (``... WHERE`` on other rows)
        counted this way checks and writes in one transaction."""
        return self._queue(list(statements), _COUNT if count else _MERGE)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        while self._committed is not None:
            await asyncio.shield(self._committed)

    def _commit_pending(self) -> None:
        """Commit everything queued (scheduled by the first writer of a turn of the loop, run at its end)."""
        batch, self._pending = self._pending, []
        committed, self._committed = self._committed, None
        try:
            self._commit(batch)
        except Exception as e:  # sqlite3.Error, DatabaseError, or a value sqlite3 cannot bind (UnicodeEncodeError,
            # OverflowError, ...): the writer gets it
            if len(batch) == 1:
                if not batch[0][2].done():
                    batch[0][2].set_exception(e)
            else:
                for item in batch:  # find the failing writer; the others commit alone
                    try:
                        self._commit([item])
                    except Exception as e:
                        if not item[2].done():
                            item[2].set_exception(e)
        finally:
            assert committed is not None
            committed.set_result(None)
        if (not self._memory and self._writer is not None
                and self._writer.total_changes - self._rows_at_checkpoint >= CHECKPOINT_AFTER_ROWS
                and time.monotonic() - self._checkpoint_at >= CHECKPOINT_MIN_INTERVAL_S):
            self._start_checkpoint()

    def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for the whole batch, on this thread; each writer's future gets its answer."""
        counts = self._on_writer(_commit_sync, self._writer, [(statements, mode) for statements, mode, _ in batch])
        self.commits += 1
        for (_, _, fut), n in zip(batch, counts, strict=True):
            if not fut.done():
                fut.set_result(n)

    # -- checkpoints --------------------------------------------------------------

    def _start_checkpoint(self) -> None:
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        assert self._writer is not None
        self._rows_at_checkpoint = self._writer.total_changes
        self._checkpoint_at = time.monotonic()
        self._checkpoint = asyncio.ensure_future(self._run_checkpoint())

    async def _run_checkpoint(self) -> None:
        """Copy the log into the file without holding the writer, then let the writer start the log over.

        The bulk is copied by a passive checkpoint on the reader's thread while commits go on. The log restarts
        from its beginning (instead of growing) only when a write begins with every page of it copied; under a
        steady load, pages committed while the bulk was copied are always left. So, back on the loop's thread
        and before any other commit, the writer copies those few itself (a passive checkpoint of its own: those
        pages and two syncs, 2 to 3 ms) and its next commit starts the log over.

        One that fails is logged, and the next is asked for after as many rows again: the log keeps every commit
        (nothing is lost); it only grows until a checkpoint succeeds."""
        try:
            busy, frames, copied = await self._run(_checkpoint_sync, self._reader)
            if self._writer is not None:
                self._on_writer(_checkpoint_sync, self._writer)
        except DatabaseError as e:
            log.warning("%s; the write-ahead log grows until a checkpoint succeeds", e)
            return
        self.checkpoints += 1
        log.debug("checkpoint of %s: %s of %s log pages copied%s", self.path, copied, frames, " (busy)" if busy else "")

    # -- reads ----------------------------------------------------------------

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a query; return all rows (``sqlite3.Row``: index or name). It sees every committed write."""
        return await self._run(_fetchall, self._reader, sql, params)

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        rows = await self._run(_fetchall, self._reader, sql, params)
        return rows[0] if rows else None

    async def pragma(self, name: str) -> Any:
        """``PRAGMA name``: its first value. One that sets something (``"max_page_count = 100"``) is set on
        both connections, the writer's after everything queued so far is committed."""
        if "=" in name and self._writer is not self._reader:
            await self.flush()
            self._on_writer(_fetchall, self._writer, f"PRAGMA {name}", ())
        row = await self.fetchone(f"PRAGMA {name}")
        return row[0] if row else None


# -- on the database thread -----------------------------------------------------------


def _connect(path: str, create: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    """Open the connection (``create=False``: only an existing file, read-write) and set it up."""
    import sqlite3

    # check_same_thread=False: the writer is opened on the database thread and used on the event loop's
    if create or path == ":memory:":
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", isolation_level=None, uri=True,
                               check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run on the reader's thread
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ksi_schema_versions ("
            " owner TEXT PRIMARY KEY, version INTEGER NOT NULL, applied_at REAL NOT NULL)"
        )
    except BaseException:
        conn.close()
        raise
    return conn


def _close(conn: sqlite3.Connection) -> None:
    conn.close()


def _checkpoint_sync(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(PASSIVE)``: (1 if it could not copy everything, log pages, pages copied)."""
    return tuple(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0])  # type: ignore[return-value]


def _fetchall(conn: sqlite3.Connection, sql: str, params: Any) -> list[sqlite3.Row]:
    return conn.execute(sql, params).fetchall()


def _rollback(conn: sqlite3.Connection, error: BaseException) -> None:
    """Roll back the open transaction, if one is open: after some errors (SQLITE_FULL, IOERR, BUSY,
    NOMEM) SQLite has rolled it back itself, and a ROLLBACK then would fail and hide ``error``."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except Exception as e:
        error.add_note(f"(the rollback after it failed too: {e})")


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
    except BaseException as e:
        _rollback(conn, e)
        raise
    return counts


def _run_grouped(conn: sqlite3.Connection, statements: list[Statement]) -> None:
    """Run ``statements`` in order, each run of consecutive same-SQL statements as one ``executemany``.

    Measured with benchmarks/host_only.py (5 rounds interleaved, one CPU): against one ``execute`` per
    statement, 3.5 us less CPU on the database thread per request (33.2 -> 29.8 us; ~5% of the total)."""
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


def _statements(script: str) -> list[str]:
    """The statements of ``script``, one by one. ``sqlite3.complete_statement`` decides where each
    ends, so a ``;`` in a string literal, a comment or a trigger's body does not split it."""
    import sqlite3

    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                statements.append(pending)
            pending = ""
    if pending.strip(" \t\r\n;"):  # an unfinished statement: SQLite names the problem when it runs
        statements.append(pending[:-1])
    return statements


def _migrate_sync(conn: sqlite3.Connection, owner: str, migrations: list[str]) -> int:
    """Apply ``owner``'s migrations not yet applied, each in its own write transaction that reads the
    version first (see :meth:`Database.migrate`). Returns the version found when nothing was left to do."""
    def version() -> int:
        row = conn.execute("SELECT version FROM ksi_schema_versions WHERE owner = ?", (owner,)).fetchone()
        return row[0] if row else 0

    found = version()
    if found >= len(migrations):  # up to date: no write lock taken (a host that only reads stays a reader)
        return found
    conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set before BEGIN
    try:
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = version()  # again, under the write lock: another process may have migrated meanwhile
                if found >= len(migrations):
                    conn.execute("COMMIT")
                    return found
                for statement in _statements(migrations[found]):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO ksi_schema_versions(owner, version, applied_at) VALUES (?, ?, ?) ON CONFLICT(owner)"
                    " DO UPDATE SET version = excluded.version, applied_at = excluded.applied_at",
                    (owner, found + 1, time.time()))
                dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
                if dangling:
                    table, rowid, parent, _ = dangling[0]
                    raise RuntimeError(f"{owner}: migration {found + 1} leaves {len(dangling)} row(s) whose foreign key "
                                       f"points nowhere (first: {table} row {rowid} -> {parent}); rolled back")
                conn.execute("COMMIT")
            except BaseException as e:
                _rollback(conn, e)
                raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
