"""The README's main job, end to end through the CLI with all four plugins."""

import json
import sqlite3

from ksi_it import EXAMPLE, cli, results


def test_plugins_lists_the_four(db):
    p = cli("plugins", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert {"queue", "litellm", "retry", "tokens"} <= set(rows)
    assert rows["queue"]["distribution"] == "ksi-queue" and "ksi_enqueue" in rows["queue"]["hooks"]
    assert rows["litellm"]["distribution"] == "ksi-provider-litellm" and "ksi_select_provider" in rows["litellm"]["hooks"]
    assert "ksi_handle_failure" in rows["retry"]["hooks"] and "ksi_record_usage" in rows["tokens"]["hooks"]


def test_example_batch_runs_offline_and_resumes_without_resending(tmp_path, db):
    out = tmp_path / "results.jsonl"
    p = cli("run", str(EXAMPLE), "--out", str(out), "--db", str(db))
    assert p.returncode == 0, p.stderr
    first = results(out)
    n_lines = len(EXAMPLE.read_text().splitlines())
    assert len(first) == n_lines and all(r["status"] == "ok" for r in first)
    assert all(r["usage"]["total_tokens"] > 0 and r["provider"] and r["text"] for r in first)
    assert "Done: 17 of 17 requests" in p.stderr and "17 ok" in p.stderr

    # every upstream call is in the ledger, and it matches the results
    u = cli("usage", "--db", str(db), "--by", "agent", "--json")
    assert u.returncode == 0, u.stderr
    rows = json.loads(u.stdout)
    assert sum(r["calls"] for r in rows) == n_lines
    assert sum(r["total_tokens"] for r in rows) == sum(r["usage"]["total_tokens"] for r in first)
    assert {r["key"] for r in rows} == {r for r in (json.loads(x).get("agent_id") for x in EXAMPLE.read_text().splitlines())}

    # rerun: nothing sent again, the results file is complete again
    p2 = cli("run", str(EXAMPLE), "--out", str(out), "--db", str(db))
    assert p2.returncode == 0, p2.stderr
    second = results(out)
    assert sorted(r["request_id"] for r in second) == sorted(r["request_id"] for r in first)
    assert {r["request_id"]: r["text"] for r in second} == {r["request_id"]: r["text"] for r in first}
    calls = sqlite3.connect(db).execute("SELECT COUNT(*) FROM ksi_schema_versions").fetchone()[0]
    assert calls >= 2
    u2 = cli("usage", "--db", str(db), "--by", "agent", "--json")
    assert sum(r["calls"] for r in json.loads(u2.stdout)) == n_lines


def test_usage_table_is_readable(tmp_path, db):
    cli("run", str(EXAMPLE), "--out", str(tmp_path / "r.jsonl"), "--db", str(db))
    p = cli("usage", "--db", str(db), "--by", "purpose")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["purpose", "calls", "requests"]
    assert any(line.startswith("research") for line in lines) and lines[-1].startswith("TOTAL")


def test_status_shows_queue_and_circuits(tmp_path, db):
    cli("run", str(EXAMPLE), "--out", str(tmp_path / "r.jsonl"), "--db", str(db))
    p = cli("status", "--json", "--db", str(db))
    assert p.returncode == 0, p.stderr
    status = json.loads(p.stdout)
    assert "queue" in status and "circuits" in status
