import asyncio
import sqlite3

import pytest

from ksi_host import Database
from ksi_host.db import WAL_AUTOCHECKPOINT_PAGES


async def test_pragmas(tmp_path):
    async with Database(tmp_path / "a.db") as db:
        assert await db.pragma("journal_mode") == "wal"
        assert await db.pragma("foreign_keys") == 1
        assert await db.pragma("synchronous") == 1  # NORMAL
        assert await db.pragma("busy_timeout") >= 1000
        assert await db.pragma("wal_autocheckpoint") == WAL_AUTOCHECKPOINT_PAGES > 1000


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
        with pytest.raises(RuntimeError, match="newer"):
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
    async with Database(path) as writer, Database(path) as reader:
        await writer.migrate("t", ["CREATE TABLE t (id INTEGER PRIMARY KEY)"])
        await writer.execute("INSERT INTO t(id) VALUES (1)")
        # the reader holds an open read transaction (a snapshot) ...
        await reader.conn.execute("BEGIN")
        assert (await reader.fetchone("SELECT COUNT(*) FROM t"))[0] == 1
        # ... and the writer still commits at once (no busy wait: WAL)
        await asyncio.wait_for(writer.execute("INSERT INTO t(id) VALUES (2)"), timeout=1.0)
        assert (await reader.fetchone("SELECT COUNT(*) FROM t"))[0] == 1  # snapshot isolation
        await reader.conn.execute("COMMIT")
        assert (await reader.fetchone("SELECT COUNT(*) FROM t"))[0] == 2


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
        assert not db.conn.in_transaction and await db.pragma("foreign_keys") == 1
        await db.execute("INSERT INTO p(id, kind) VALUES (2, 'b')")  # the connection still writes


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
