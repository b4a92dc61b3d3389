"""``ksi-host run --out``: a results file that cannot be written, or must not be, is one line, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

ONLY = {"KSI_HOST_PLUGINS": "fakequeue,echo,fakeretry"}


def batch(tmp_path: Path, n: int = 3) -> Path:
    f = tmp_path / "requests.jsonl"
    f.write_text("".join(json.dumps({"model": "echo", "prompt": f"p{i}", "request_id": f"r{i}"}) + "\n" for i in range(n)))
    return f


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("where", ["a-folder", "no-such-folder/results.jsonl"])
def test_a_results_file_that_cannot_be_opened_exits_2_naming_it(tmp_path, fake_site, where):
    (tmp_path / "a-folder").mkdir()
    out = tmp_path / where
    p = run_cli(["run", str(batch(tmp_path)), "--db", str(tmp_path / "k.db"), "--out", str(out)], site=fake_site, env=ONLY)
    assert p.returncode == 2
    assert one_line(p.stderr).startswith(f"ksi-host: cannot write {out}: ")


def test_results_over_the_input_or_the_database_are_refused_and_both_survive(tmp_path, fake_site):
    f = batch(tmp_path)
    db = tmp_path / "k.db"
    assert run_cli(["run", str(f), "--db", str(db), "--out", str(tmp_path / "first.jsonl")], site=fake_site, env=ONLY).returncode == 0
    before_input, before_db = f.read_bytes(), db.read_bytes()
    (tmp_path / "link.jsonl").hardlink_to(f)
    for out, what in ((f, "the input file"), (tmp_path / "link.jsonl", "the input file"), (db, "the database")):
        p = run_cli(["run", str(f), "--db", str(db), "--out", str(out)], site=fake_site, env=ONLY)
        assert p.returncode == 2
        assert one_line(p.stderr) == (f"ksi-host: --out {out} is {what}: writing the results there would destroy it "
                                      "(choose another file)")
    # $KSI_HOST_DB names the database when --db does not
    p = run_cli(["run", str(f), "--out", str(db)], site=fake_site, env={**ONLY, "KSI_HOST_DB": str(db)})
    assert p.returncode == 2 and "is the database" in p.stderr
    assert f.read_bytes() == before_input and db.read_bytes() == before_db


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_stops_the_batch_with_one_line_exit_1(tmp_path, fake_site):
    p = run_cli(["run", str(batch(tmp_path)), "--db", str(tmp_path / "k.db"), "--out", "/dev/full"], site=fake_site, env=ONLY)
    assert p.returncode == 1
    assert one_line(p.stderr) == ("ksi-host: cannot write the results to /dev/full: No space left on device; every "
                                  "finished result is stored: run the same command again to write them")


def test_a_reader_that_leaves_stops_the_batch_with_one_line_exit_1(tmp_path, fake_site):
    f = batch(tmp_path, 200)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_site), os.environ.get("PYTHONPATH", "")]), **ONLY}
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.cli", "run", str(f), "--db", str(tmp_path / "k.db")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    json.loads(p.stdout.readline())  # the first result, then the reader goes away (as `| head -1` does)
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert one_line(err) == ("ksi-host: cannot write the results to stdout: Broken pipe; every finished result is "
                             "stored: run the same command again to write them")


def test_a_database_that_is_the_input_file_is_refused_and_the_input_survives(tmp_path, fake_site):
    for f in (batch(tmp_path), tmp_path / "empty.jsonl"):
        f.touch()
        before = f.read_bytes()
        p = run_cli(["run", str(f), "--db", str(f)], site=fake_site, env=ONLY)
        assert p.returncode == 2
        assert one_line(p.stderr) == f"ksi-host: --db {f} is the input file {f}: the database needs a file of its own"
        assert f.read_bytes() == before
