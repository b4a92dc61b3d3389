import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

import ksi_host.db
from ksi_host import Database
from ksi_host.errors import DatabaseError, DatabaseStartupError, OperationalError, StartupError


async def test_pragmas(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        assert await db.pragma("journal_mode") == "wal"
        assert await db.pragma("foreign_keys") == 1
        assert await db.pragma("synchronous") == 1  # NORMAL
        assert await db.pragma("busy_timeout") >= 1000
        assert await db.pragma("wal_autocheckpoint") == 0  # checkpoints run on the reader's thread


@pytest.fixture
def checkpoint_after_300_rows(monkeypatch):
    """Checkpoints after every 300 rows, with no minimum interval between them."""
    monkeypatch.setattr(ksi_host.db, "CHECKPOINT_AFTER_ROWS", 300)
    monkeypatch.setattr(ksi_host.db, "CHECKPOINT_MIN_INTERVAL_S", 0.0)


async def test_writes_commit_on_the_loop_thread_and_checkpoints_run_on_the_database_thread(tmp_path, checkpoint_after_300_rows):
    path = tmp_path / "a.db"
    async with Database(path) as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY, thread INTEGER, pad TEXT)"])
        db._writer.create_function("thread_id", 0, threading.get_ident)  # (the helper's own test: its writer)
        await db.execute("INSERT INTO t(thread, pad) VALUES (thread_id(), '')")
        assert (await db.fetchone("SELECT thread FROM t"))[0] == threading.get_ident()
        assert db._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # never inside a commit

        pad = "x" * 2000  # every row its own page: the log grows by a page a row
        for _ in range(5):
            await db.executemany("INSERT INTO t(thread, pad) VALUES (?, ?)", [(0, pad)] * 50)
        assert db.checkpoints == 0 and path.stat().st_size < 100_000  # the rows are in the log, not yet in the file
        await db.executemany("INSERT INTO t(thread, pad) VALUES (?, ?)", [(0, pad)] * 50)
        for _ in range(200):
            if db.checkpoints:
                break
            await asyncio.sleep(0.01)
        assert db.checkpoints == 1
        assert path.stat().st_size > 300 * 2000  # copied into the file


async def test_under_a_steady_load_the_log_starts_over_after_each_checkpoint(tmp_path, checkpoint_after_300_rows):
    path = tmp_path / "a.db"
    async with Database(path) as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY, pad TEXT)"])
        pad = "x" * 2000

        async def writer(n: int) -> None:  # never a pause for the checkpoint to catch up in
            for _ in range(n):
                await db.execute("INSERT INTO t(pad) VALUES (?)", (pad,))

        await asyncio.gather(*(writer(750) for _ in range(4)))  # 3,000 pages of log written
        assert db.checkpoints >= 3
        assert Path(f"{path}-wal").stat().st_size < 1_500 * 4096  # it started over: it did not grow to 3,000 pages
        assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 3000


async def test_migrations_are_recorded_per_owner_and_run_once(tmp_path):
    path = tmp_path / "a.db"
    v1 = "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"
    v2 = "ALTER TABLE t ADD COLUMN extra INTEGER; CREATE INDEX t_name ON t(name)"
    async with Database(path) as db:
        assert await db.migrate("one", [v1]) == 1
        await db.execute("INSERT INTO t(name) VALUES (?)", ("x",))
        assert await db.migrate("two", ["CREATE TABLE u (id INTEGER PRIMARY KEY)"]) == 1
    async with Database(path) as db:
        assert await db.migrate("one", [v1, v2]) == 2  # v1 is not run again (it would fail)
        assert await db.schema_version("one") == 2 and await db.schema_version("two") == 1
        assert [r["name"] for r in await db.fetchall("SELECT name FROM t")] == ["x"]
        with pytest.raises(DatabaseStartupError, match=r"the tables of one are at schema version 2, newer than this "
                                                       r"code knows \(1\)"):
            await db.migrate("one", [v1])


async def test_group_commit_shares_transactions_and_returns_when_durable(tmp_path):
    path = tmp_path / "a.db"
    async with Database(path) as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)"])
        before = db.commits
        await asyncio.gather(*[db.execute("INSERT INTO t(v) VALUES (?)", (i,)) for i in range(500)])
        assert db.commits - before < 10  # 500 writers, a handful of commits
        # durable: a separate connection sees all rows as soon as the writers return
        other = sqlite3.connect(path)
        assert other.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 500
        other.close()


async def test_a_failing_statement_fails_only_its_writer(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"])
        results = await asyncio.gather(
            db.execute("INSERT INTO t(id) VALUES (1)"), db.execute("INSERT INTO t(id) VALUES (1)"),
            db.execute("INSERT INTO t(id) VALUES (2)"), return_exceptions=True)
        assert results[0] is None and isinstance(results[1], sqlite3.IntegrityError) and results[2] is None
        assert [r[0] for r in await db.fetchall("SELECT id FROM t ORDER BY id")] == [1, 2]


async def test_reader_does_not_block_writer(tmp_path):
    path = tmp_path / "a.db"
    async with Database(path) as writer:
        await writer.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"])
        await writer.execute("INSERT INTO t(id) VALUES (1)")
        # another connection holds an open read transaction (a snapshot) ...
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
        # ... and the writer still commits at once (no busy wait: WAL)
        await asyncio.wait_for(writer.execute("INSERT INTO t(id) VALUES (2)"), timeout=1.0)
        assert reader.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1  # snapshot isolation
        reader.execute("COMMIT")
        assert reader.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2
        reader.close()


async def test_write_batch_is_atomic(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", ["CREATE TABLE p (id INTEGER PRIMARY KEY); "
                               "CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER NOT NULL REFERENCES p(id))"])
        await db.write_batch([("INSERT INTO p(id) VALUES (1)", ()), ("INSERT INTO c(id, p) VALUES (1, 1)", ())])
        with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced
            await db.execute("INSERT INTO c(id, p) VALUES (2, 99)")
        assert (await db.fetchone("SELECT COUNT(*) FROM c"))[0] == 1
        # a batch with a failing statement leaves nothing behind, even beside other writers
        results = await asyncio.gather(
            db.write_batch([("INSERT INTO p(id) VALUES (2)", ()), ("INSERT INTO c(id, p) VALUES (3, 98)", ())]),
            db.execute("INSERT INTO p(id) VALUES (3)"), return_exceptions=True)
        assert isinstance(results[0], sqlite3.IntegrityError) and results[1] is None
        assert [r[0] for r in await db.fetchall("SELECT id FROM p ORDER BY id")] == [1, 3]


PARENT_CHILD = ("CREATE TABLE p (id INTEGER PRIMARY KEY, kind TEXT CHECK (kind IN ('a', 'b', 'c')));"
                " CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER NOT NULL REFERENCES p(id))")


async def test_a_migration_may_rebuild_a_table_others_reference(tmp_path):
    rebuild = ("CREATE TABLE p_new (id INTEGER PRIMARY KEY, kind TEXT CHECK (kind = 'a' OR kind = 'b' OR kind = 'c'));"
               " INSERT INTO p_new (id, kind) SELECT id, kind FROM p; DROP TABLE p; ALTER TABLE p_new RENAME TO p")
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", [PARENT_CHILD])
        await db.write_batch([("INSERT INTO p(id, kind) VALUES (1, 'a')", ()), ("INSERT INTO c(id, p) VALUES (1, 1)", ())])
        assert await db.migrate("t", [PARENT_CHILD, rebuild]) == 2
        assert "kind = 'a' OR" in (await db.fetchone("SELECT sql FROM sqlite_master WHERE name = 'p'"))[0]
        assert [tuple(r) for r in await db.fetchall("SELECT c.id, p.kind FROM c JOIN p ON p.id = c.p")] == [(1, "a")]
        assert await db.pragma("foreign_keys") == 1  # back on after the migration
        with pytest.raises(sqlite3.IntegrityError):
            await db.execute("INSERT INTO c(id, p) VALUES (2, 99)")


async def test_a_migration_that_breaks_a_foreign_key_or_fails_is_rolled_back(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", [PARENT_CHILD])
        await db.write_batch([("INSERT INTO p(id, kind) VALUES (1, 'a')", ()), ("INSERT INTO c(id, p) VALUES (1, 1)", ())])
        with pytest.raises(RuntimeError, match=r"t: migration 2 leaves 1 row\(s\) whose foreign key points nowhere"):
            await db.migrate("t", [PARENT_CHILD, "DELETE FROM p"])
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await db.migrate("t", [PARENT_CHILD, "CREATE TABLE x (id INTEGER); INSERT INTO nowhere VALUES (1)"])
        assert await db.schema_version("t") == 1
        assert (await db.fetchone("SELECT COUNT(*) FROM p"))[0] == 1
        assert await db.fetchone("SELECT name FROM sqlite_master WHERE name = 'x'") is None
        assert await db.pragma("foreign_keys") == 1
        await db.execute("INSERT INTO p(id, kind) VALUES (2, 'b')")  # no transaction left open: the connection still writes


async def test_a_counted_batch_answers_the_rows_it_changed_beside_other_writers(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"])
        await db.execute("INSERT INTO t(id, v) VALUES (2, 'old')")
        insert = "INSERT INTO t(id, v) VALUES (?, ?) ON CONFLICT(id) DO NOTHING"
        plain, counted, other, update = await asyncio.gather(
            db.execute(insert, (10, "a")),
            db.write_batch([(insert, (1, "x")), (insert, (2, "skipped")), (insert, (3, "x"))], count=True),
            db.execute(insert, (11, "b")),
            db.write_batch([("UPDATE t SET v = 'new' WHERE id >= 10", ())], count=True))
        assert (plain, counted, other, update) == (None, 2, None, 2)  # the conflict is not counted
        assert [tuple(r) for r in await db.fetchall("SELECT id, v FROM t ORDER BY id")] == [
            (1, "x"), (2, "old"), (3, "x"), (10, "new"), (11, "new")]


# -- a database that cannot do its job -------------------------------------------------------------


def _db_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ksi-db")]


async def test_a_file_that_is_not_a_database_fails_to_open_naming_it_and_leaves_no_thread(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not an SQLite database, only text " * 200)
    before = _db_threads()
    with pytest.raises(DatabaseStartupError) as caught:
        await Database(path).open()
    assert str(caught.value) == f"database {path}: file is not a database"
    assert isinstance(caught.value, StartupError) and isinstance(caught.value, OperationalError)
    assert _db_threads() == before  # a thread left running would keep the process from exiting


async def test_a_path_that_cannot_be_opened_fails_to_open_naming_it(tmp_path):
    (tmp_path / "a-folder.db").mkdir()
    with pytest.raises(DatabaseStartupError, match=r"a-folder\.db: unable to open database file \(does its folder exist"):
        await Database(tmp_path / "a-folder.db").open()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DatabaseStartupError, match=r"a-file/x\.db: cannot create its folder .*a-file: File exists"):
        await Database(tmp_path / "a-file" / "x.db").open()
    assert _db_threads() == []


async def test_create_false_opens_an_existing_file_only_and_creates_nothing(tmp_path):
    missing = tmp_path / "sub" / "missing.db"
    with pytest.raises(DatabaseStartupError, match=r"missing\.db: no such file"):
        await Database(missing, create=False).open()
    assert not (tmp_path / "sub").exists()
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"])
        await db.execute("INSERT INTO t(id) VALUES (1)")
    async with Database(tmp_path / "a.db", create=False) as db:
        await db.execute("INSERT INTO t(id) VALUES (2)")  # opened read-write
        assert [r[0] for r in await db.fetchall("SELECT id FROM t ORDER BY id")] == [1, 2]
        assert await db.pragma("journal_mode") == "wal"


async def test_a_full_database_fails_its_writers_with_sqlites_reason_and_keeps_what_was_committed(tmp_path):
    path = tmp_path / "a.db"
    async with Database(path) as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY, filler TEXT)"])
        pages = await db.pragma("page_count")
        await db.pragma(f"max_page_count = {pages + 3}")  # a disk with three pages left
        committed = 0
        with pytest.raises(DatabaseError) as caught:
            for i in range(100):
                await db.execute("INSERT INTO t(id, filler) VALUES (?, ?)", (i, "x" * 1000))
                committed += 1
        # SQLite rolled the transaction back itself: its reason is not hidden behind a failed ROLLBACK
        assert str(caught.value) == f"database {path}: database or disk is full"
        assert not isinstance(caught.value, StartupError)
        assert 0 < committed < 100
        # a batch of writers, one transaction: each of them gets the error
        many = await asyncio.gather(*(db.execute("INSERT INTO t(id, filler) VALUES (?, ?)", (1000 + i, "x" * 1000))
                                      for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, DatabaseError) for r in many)
        await db.pragma(f"max_page_count = {pages + 1000}")  # space again: the connection writes on
        await db.execute("INSERT INTO t(id, filler) VALUES (?, ?)", (5000, "y"))
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM t").fetchone()[0] == committed + 1
    con.close()


async def test_a_read_only_database_is_a_database_error_and_a_startup_error_while_migrating(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"])
        await db.pragma("query_only = 1")  # SQLite answers writes as it does on a read-only file
        with pytest.raises(DatabaseError, match=r"a\.db: attempt to write a readonly database \(the file or its folder"):
            await db.execute("INSERT INTO t(id) VALUES (1)")
        with pytest.raises(DatabaseStartupError, match="attempt to write a readonly database"):
            await db.migrate("u", ["CREATE TABLE u (id INTEGER PRIMARY KEY)"])
        assert await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"]) == 1  # up to date: only reads


async def test_a_damaged_page_is_a_database_error_naming_the_file(tmp_path):
    path = tmp_path / "a.db"
    async with Database(path) as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY, filler TEXT)"])
        await db.executemany("INSERT INTO t(id, filler) VALUES (?, ?)", [(i, "x" * 500) for i in range(200)])
        await db.pragma("wal_checkpoint(TRUNCATE)")
        page_size = await db.pragma("page_size")
    with open(path, "r+b") as f:  # the header and the schema (pages 1-2) stay; table pages are overwritten
        f.seek(3 * page_size)
        f.write(b"\xff" * (5 * page_size))
    async with Database(path) as db:  # the header is fine: it opens
        with pytest.raises(DatabaseError, match=r"a\.db: database disk image is malformed \(the file is damaged\)"):
            await db.fetchall("SELECT * FROM t")


async def test_migrations_started_together_apply_each_script_once(tmp_path):
    """Two connections (two processes) migrate at once while a third holds the write lock: both read
    version 0 first; the version is read again under the write lock, so the script runs once."""
    path = tmp_path / "a.db"
    async with Database(path):
        pass
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    scripts = ["CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t(id) VALUES (1)"]
    async with Database(path) as a, Database(path) as b:
        both = asyncio.gather(a.migrate("t", scripts), b.migrate("t", scripts), return_exceptions=True)
        await asyncio.sleep(0.5)  # both are waiting for the write lock now
        lock.execute("COMMIT")
        assert await both == [1, 1]
        assert (await a.fetchone("SELECT COUNT(*) FROM t"))[0] == 1
    lock.close()


def test_migration_scripts_split_at_statement_ends_only():
    from ksi_host.db import _statements

    script = """
        CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT DEFAULT 'a;b');  -- a comment; with a semicolon
        CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN UPDATE t SET v = 'c;d' WHERE id = new.id; END;
        INSERT INTO t(id) VALUES (1)
    """
    parts = _statements(script)
    assert len(parts) == 3 and parts[1].strip().startswith("-- a comment; with a semicolon\n        CREATE TRIGGER")
    assert parts[1].rstrip().endswith("END;") and parts[2].strip().rstrip(";").strip() == "INSERT INTO t(id) VALUES (1)"
    con = sqlite3.connect(":memory:")
    for statement in parts:
        con.execute(statement)
    assert con.execute("SELECT v FROM t").fetchall() == [("c;d",)]


async def test_a_write_waits_for_another_connections_write_lock_and_then_commits(tmp_path):
    path = tmp_path / "a.db"
    async with Database(path) as db:
        await db.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"])
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock (`ksi-host cancel` writing its row)
        threading.Timer(0.2, lambda: other.execute("COMMIT")).start()
        started = asyncio.get_running_loop().time()
        await db.execute("INSERT INTO t(id) VALUES (1)")  # the busy handler waits; no DatabaseError
        assert asyncio.get_running_loop().time() - started >= 0.15
        assert (await db.fetchone("SELECT COUNT(*) FROM t"))[0] == 1
        other.close()
