"""What ``ksi-host`` says about a database that cannot do its job: one line naming the file and the problem,
exit 2 before any work (1 once work ran), never a traceback, never a hang; read-only commands create nothing.

In-test plugins (a fake distribution): the fake queue and provider of conftest, and a ledger that writes a row
per upstream call through ``host.db`` (``KSI_TEST_EXTRA_PAGES`` lets its database grow by that many pages only:
a full disk)."""

import json
import sqlite3

from conftest import make_dist, run_cli

LEDGER = '''
import os
from ksi_host import hookimpl

class Ledger:
    @hookimpl
    async def ksi_startup(self, host):
        await host.db.migrate("test-ledger", ["CREATE TABLE test_ledger (id INTEGER PRIMARY KEY, request_id TEXT, filler TEXT)"])
        extra = os.environ.get("KSI_TEST_EXTRA_PAGES")
        if extra:
            pages = await host.db.pragma("page_count")
            await host.db.pragma(f"max_page_count = {pages + int(extra)}")

    @hookimpl
    async def ksi_record_usage(self, host, call):
        await host.db.execute("INSERT INTO test_ledger (request_id, filler) VALUES (?, ?)", (call.request_id, "x" * 3000))
'''

PLUGINS = {"KSI_HOST_PLUGINS": "fakequeue,echo,fakeretry,ledger"}
TIMEOUT = 30  # a command that hangs fails the test instead of blocking it


def site(tmp_path, fake_site):
    make_dist(fake_site, "ksi-fake-ledger", "ksi_fake_ledger", LEDGER, {"ledger": "ksi_fake_ledger:Ledger"})
    return fake_site


def batch(tmp_path, n):
    f = tmp_path / "requests.jsonl"
    f.write_text("".join(json.dumps({"model": "echo", "prompt": f"p{i}", "request_id": f"r{i}"}) + "\n" for i in range(n)))
    return f


def one_line(p):
    """The one line ``ksi-host`` printed on stderr (and that it printed no traceback)."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_read_only_commands_on_a_missing_database_say_so_and_create_nothing(tmp_path, fake_site):
    s = site(tmp_path, fake_site)
    for command in (["status"], ["usage"], ["cancel", "r0"], ["clear-session", "s"]):
        p = run_cli(command, site=s, env=PLUGINS, cwd=tmp_path, timeout=TIMEOUT)  # the default: ./ksi-host.db
        assert p.returncode == 2, (command, p.stderr)
        assert one_line(p).startswith("ksi-host: database ksi-host.db: no such file"), command
        p = run_cli([*command, "--db", str(tmp_path / "sub" / "k.db")], site=s, env=PLUGINS, timeout=TIMEOUT)
        assert p.returncode == 2 and one_line(p).startswith(f"ksi-host: database {tmp_path / 'sub' / 'k.db'}: no such file")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["site"]  # no ksi-host.db, no sub/


def test_a_file_that_is_not_a_database_stops_every_command_at_once(tmp_path, fake_site):
    s = site(tmp_path, fake_site)
    db = tmp_path / "garbage.db"
    db.write_bytes(b"\x00\x01 not a database \xff" * 500)
    f = batch(tmp_path, 3)
    for command in (["run", str(f)], ["status"], ["usage"], ["cancel", "r0"]):
        p = run_cli([*command, "--db", str(db)], site=s, env=PLUGINS, timeout=TIMEOUT)  # (used to hang forever)
        assert p.returncode == 2, (command, p.stderr)
        assert one_line(p) == f"ksi-host: database {db}: file is not a database"


def test_a_path_that_cannot_be_opened_exits_2_naming_it(tmp_path, fake_site):
    s = site(tmp_path, fake_site)
    (tmp_path / "folder.db").mkdir()
    p = run_cli(["run", str(batch(tmp_path, 1)), "--db", str(tmp_path / "folder.db")], site=s, env=PLUGINS, timeout=TIMEOUT)
    assert p.returncode == 2
    assert one_line(p).startswith(f"ksi-host: database {tmp_path / 'folder.db'}: unable to open database file")


def test_tables_newer_than_the_code_exit_2_naming_them(tmp_path, fake_site):
    s = site(tmp_path, fake_site)
    db = tmp_path / "k.db"
    f = batch(tmp_path, 1)
    assert run_cli(["run", str(f), "--db", str(db)], site=s, env=PLUGINS, timeout=TIMEOUT).returncode == 0
    con = sqlite3.connect(db)
    con.execute("UPDATE ksi_schema_versions SET version = 7 WHERE owner = 'test-ledger'")
    con.commit()
    con.close()
    for command in (["run", str(f)], ["status"]):
        p = run_cli([*command, "--db", str(db)], site=s, env=PLUGINS, timeout=TIMEOUT)
        assert p.returncode == 2, p.stderr
        assert one_line(p) == (f"ksi-host: database {db}: the tables of test-ledger are at schema version 7, newer than "
                               "this code knows (1): was it written by a newer test-ledger?")


def test_a_full_disk_during_a_batch_exits_1_with_one_line_and_keeps_what_was_written(tmp_path, fake_site):
    s = site(tmp_path, fake_site)
    db = tmp_path / "k.db"
    out = tmp_path / "results.jsonl"
    p = run_cli(["run", str(batch(tmp_path, 200)), "--db", str(db), "--out", str(out), "--concurrency", "4"], site=s,
                env={**PLUGINS, "KSI_TEST_EXTRA_PAGES": "40"}, timeout=TIMEOUT)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert f"ksi-host: database {db}: database or disk is full" in p.stderr.splitlines()[-1:]
    done = [json.loads(x)["request_id"] for x in out.read_text().splitlines()]
    con = sqlite3.connect(db)
    ledger = [r[0] for r in con.execute("SELECT request_id FROM test_ledger")]
    con.close()
    assert 0 < len(ledger) < 200
    assert set(done) <= set(ledger)  # every result written out had its ledger row committed first
