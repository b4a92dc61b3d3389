"""``ksi-host`` end to end in subprocesses, with in-test plugins installed as a fake distribution."""

import json
import re

from conftest import ROOT, make_dist, run_cli

ONLY = {"KSI_HOST_PLUGINS": "fakequeue,echo,fakeretry"}


def test_plugins_json_lists_name_distribution_version_hooks(fake_site):
    p = run_cli(["plugins", "--json"], site=fake_site, env={"KSI_HOST_PLUGINS": "fakequeue,echo"})
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert rows == [
        {"name": "echo", "distribution": "ksi-fake", "version": "0.1", "hooks": ["ksi_list_providers", "ksi_select_provider"]},
        {"name": "fakequeue", "distribution": "ksi-fake", "version": "0.1", "hooks": ["ksi_enqueue"]},
    ]


def test_disable_blocks_named_plugins(fake_site):
    p = run_cli(["plugins", "--json"], site=fake_site,
                env={"KSI_HOST_PLUGINS": "fakequeue,echo,broken", "KSI_HOST_DISABLE": "broken,echo"})
    assert [r["name"] for r in json.loads(p.stdout)] == ["fakequeue"]


def test_plugins_human_form(fake_site):
    p = run_cli(["plugins"], site=fake_site, env={"KSI_HOST_PLUGINS": "echo"})
    assert p.returncode == 0 and "echo  (ksi-fake 0.1)" in p.stdout and "ksi_select_provider" in p.stdout


def test_unknown_plugin_name_in_env_is_a_clear_error(fake_site):
    p = run_cli(["plugins"], site=fake_site, env={"KSI_HOST_PLUGINS": "nosuch"})
    assert p.returncode == 2 and "KSI_HOST_PLUGINS names 'nosuch'" in p.stderr


def test_plugin_that_fails_to_import_stops_startup_with_one_line(tmp_path):
    site = make_dist(tmp_path / "s", "ksi-bad", "ksi_bad_plugin", "import no_such_module\n", {"bad": "ksi_bad_plugin:Plugin"})
    p = run_cli(["plugins"], site=site, env={"KSI_HOST_PLUGINS": "bad"})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "ksi-host: plugin 'bad' (ksi_bad_plugin:Plugin) failed to load: ModuleNotFoundError: No module named 'no_such_module'"]


def write_batch(tmp_path, lines):
    f = tmp_path / "requests.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_run_writes_one_result_per_line_and_names_bad_lines(tmp_path, fake_site):
    f = write_batch(tmp_path, [
        json.dumps({"model": "echo-1", "prompt": "one", "session_id": "s1", "request_id": "r1"}),
        "{not json",
        "[1, 2]",
        json.dumps({"model": "echo-1"}),
        json.dumps({"model": "nowhere", "prompt": "x"}),
        "",
        json.dumps({"model": "echo-1", "prompt": "two", "priority": "urgent"}),
        json.dumps({"model": "echo-1", "prompt": "three", "session_id": "s1"}),
    ])
    out = tmp_path / "results.jsonl"
    p = run_cli(["run", str(f), "--out", str(out), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(results) == 7
    by_msg = {r["error"]["message"].split(":")[0] if r["error"] else r["request_id"]: r for r in results}
    assert by_msg["r1"]["text"] == "echo: one" and by_msg["r1"]["status"] == "ok"
    errors = sorted(r["error"]["message"] for r in results if r["error"])
    assert errors[0].startswith("line 2: json: not valid JSON")
    assert errors[1] == "line 3: request: must be a JSON object, got list"
    assert errors[2].startswith("line 4: messages: is required")
    assert errors[3].startswith("line 5: model: no provider serves model 'nowhere' (configured models: echo*)")
    assert errors[4].startswith("line 7: priority: must be one of")
    ok = [r for r in results if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["usage"]["total_tokens"] == 5 for r in ok)
    for r in results:
        assert set(r) >= {"request_id", "status", "text", "model", "provider", "session_id", "usage", "attempts",
                          "error", "started_at", "finished_at"}
    assert "Done: 7 of 7 requests" in p.stderr and "2 ok, 5 failed" in p.stderr


def test_a_line_with_a_key_that_is_not_unicode_is_rejected_and_the_batch_goes_on(tmp_path, fake_site):
    # found by fuzzing ksi-host serve: the key became the field its error names, and writing that error out
    # stopped the run as a programming error (exit 70) with the lines after it unread
    f = write_batch(tmp_path, [
        '{"model": "echo-1", "messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}',
        json.dumps({"model": "echo-1", "prompt": "after", "request_id": "r2"}),
    ])
    out = tmp_path / "results.jsonl"
    p = run_cli(["run", str(f), "--out", str(out), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    bad, ok = (json.loads(x) for x in out.read_text(encoding="utf-8").splitlines())
    assert bad["error"]["message"].startswith("line 1: messages[0].\\ud800: unknown key")
    assert ok["request_id"] == "r2" and ok["text"] == "echo: after"


def test_run_all_ok_exits_0_and_ids_are_stable(tmp_path, fake_site):
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": f"p{i}"}) for i in range(5)])
    ids = []
    for _ in range(2):
        p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
        assert p.returncode == 0, p.stderr
        ids.append(sorted(json.loads(x)["request_id"] for x in p.stdout.splitlines()))
    assert ids[0] == ids[1] and len(set(ids[0])) == 5


def test_run_reads_stdin(tmp_path, fake_site):
    p = run_cli(["run", "-", "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY,
                input=json.dumps({"model": "echo", "prompt": "hey"}) + "\n")
    assert p.returncode == 0 and json.loads(p.stdout)["text"] == "echo: hey"


def test_run_without_queue_plugin_exits_2_naming_hook_and_how_to_install_it(tmp_path, fake_site):
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site, env={"KSI_HOST_PLUGINS": "echo"}, cwd=ROOT)
    assert p.returncode == 2
    # the plugins are not on a package index: the hint is what works from a checkout
    assert p.stderr.strip() == "ksi-host: no plugin implements ksi_enqueue: install ksi-queue: pip install -e plugins/queue"
    assert p.stdout == ""


def test_run_without_provider_plugin_exits_2(tmp_path, fake_site):
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site, env={"KSI_HOST_PLUGINS": "fakequeue"},
                cwd=tmp_path)
    assert p.returncode == 2
    # from elsewhere, the checkout's folder in full
    assert (f"no plugin implements ksi_select_provider: install ksi-provider-litellm: pip install -e {ROOT / 'plugins' / 'provider'}"
            in p.stderr)


def test_programming_error_exits_nonzero_with_traceback_naming_plugin_and_hook(tmp_path, fake_site):
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site,
                env={"KSI_HOST_PLUGINS": "fakequeue,echo,broken"})
    assert p.returncode == 70
    assert "Traceback" in p.stderr and "KeyError: 'ledger bug'" in p.stderr
    assert "raised by plugin 'broken' in hook ksi_record_usage" in p.stderr


def test_operational_error_in_a_request_fails_only_that_request(tmp_path, fake_site):
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "rate"}), json.dumps({"model": "echo", "prompt": "fine"})])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 1
    statuses = sorted((json.loads(x)["status"], (json.loads(x)["error"] or {}).get("type")) for x in p.stdout.splitlines())
    assert statuses == [("error", "RateLimited"), ("ok", None)]


def test_config_errors_exit_2_naming_the_key(tmp_path, fake_site):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[host]\nconcurrency = 'many'\n")
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    p = run_cli(["run", str(f), "--config", str(cfg), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "config key host.concurrency: expected an integer" in p.stderr
    cfg.write_text("[nosuch]\nx = 1\n")
    p = run_cli(["status", "--config", str(cfg), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "config table [nosuch]: unknown table" in p.stderr


def test_missing_input_file_and_bad_concurrency_exit_2(tmp_path, fake_site):
    p = run_cli(["run", str(tmp_path / "nope.jsonl")], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "cannot read" in p.stderr
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    p = run_cli(["run", str(f), "--concurrency", "0"], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "--concurrency" in p.stderr


def test_usage_without_tokens_plugin_says_what_to_install(tmp_path, fake_site):
    (tmp_path / "k.db").touch()  # an existing (empty) database: read-only commands create none
    p = run_cli(["usage", "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "no plugin implements ksi_usage_report: install ksi-tokens: pip install -e " in p.stderr


def test_status_lists_providers(tmp_path, fake_site):
    (tmp_path / "k.db").touch()  # an existing (empty) database: read-only commands create none
    p = run_cli(["status", "--json", "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["providers"] == [{"name": "echo-main", "model": "echo*", "plugin": "fake", "state": "closed"}]


def test_host_log_level_logs_to_stderr_and_is_validated(tmp_path, fake_site):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[host]\nlog_level = "DEBUG"\n')
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    p = run_cli(["run", str(f), "--config", str(cfg), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 0, p.stderr
    assert " DEBUG " in p.stderr  # e.g. asyncio's or ksi_host's debug records
    assert json.loads(p.stdout)["status"] == "ok"  # results stay alone on stdout
    cfg.write_text('[host]\nlog_level = "LOUD"\n')
    p = run_cli(["run", str(f), "--config", str(cfg), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "log_level must be one of" in p.stderr


def test_bad_argument_values_are_usage_errors_exit_2(tmp_path, fake_site):
    db = ["--db", str(tmp_path / "k.db")]
    p = run_cli(["usage", "--since", "yesterday", *db], site=fake_site, env={"KSI_HOST_PLUGINS": "fakeusage"})
    assert p.returncode == 2 and "--since: expected a duration like 24h" in p.stderr and "usage:" in p.stderr
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    for bad in ("0", "many", "-3"):
        p = run_cli(["run", str(f), "--concurrency", bad, *db], site=fake_site, env=ONLY)
        assert p.returncode == 2 and "--concurrency" in p.stderr, (bad, p.stderr)
    p = run_cli(["usage", "--by", "colour", *db], site=fake_site, env={"KSI_HOST_PLUGINS": "fakeusage"})
    assert p.returncode == 2 and "--by" in p.stderr
    p = run_cli(["logs", "-n", str(10**20), *db], site=fake_site, env=ONLY)  # past SQLite's integers
    assert p.returncode == 2 and "argument -n: must be at most 1,000,000,000" in p.stderr and "Traceback" not in p.stderr


def test_version(fake_site):
    from ksi_host import __version__

    p = run_cli(["--version"], site=fake_site)
    assert p.returncode == 0 and p.stdout.strip() == f"ksi-host {__version__}"


def test_status_rounds_money_and_fits_the_terminal_json_keeps_everything(tmp_path, fake_site):
    env = {"KSI_HOST_PLUGINS": "fakestatus,echo", "COLUMNS": "80"}
    (tmp_path / "k.db").touch()  # an empty database: read-only commands open only what exists
    p = run_cli(["status", "--db", str(tmp_path / "k.db")], site=fake_site, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "cost_usd: 0.0001215" in lines
    assert max(map(len, lines)) <= 80, p.stdout
    dep_a = next(line for line in lines if line.startswith("dep-a"))
    assert dep_a.endswith("\u2026") and "ProviderUnavailable: xxx" in dep_a  # cut, with an ellipsis
    p = run_cli(["status", "--json", "--db", str(tmp_path / "k.db")], site=fake_site, env=env)
    status = json.loads(p.stdout)
    assert status["circuits"][0]["last_error"] == "ProviderUnavailable: " + "x" * 280
    assert status["usage"]["cost_usd"] == 0.00012150000000000001


def test_usage_table_shows_unpriced_calls(tmp_path, fake_site):
    (tmp_path / "k.db").touch()
    p = run_cli(["usage", "--db", str(tmp_path / "k.db")], site=fake_site, env={"KSI_HOST_PLUGINS": "fakeusage"})
    assert p.returncode == 0, p.stderr
    head, _, priced, free, total = p.stdout.splitlines()
    assert head.split() == ["model", "calls", "requests", "prompt", "completion", "total", "cost_usd", "unpriced", "calls"]
    assert priced.split()[-2:] == ["0.0021", "0"]
    assert free.split()[-2:] == ["n/a", "3"]  # no cost known: said so, and how many calls
    assert total.split()[-2:] == ["0.0021", "3"]  # a partial sum, with the calls it leaves out beside it


def test_a_disabled_plugins_table_is_ignored_with_a_warning(tmp_path, fake_site):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fakeretry]\nattempts = 3\n")
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    run = ["run", str(f), "--config", str(cfg), "--db", str(tmp_path / "k.db")]
    for env, why in (({"KSI_HOST_PLUGINS": "fakequeue,echo,fakeretry", "KSI_HOST_DISABLE": "fakeretry"}, "KSI_HOST_DISABLE"),
                     ({"KSI_HOST_PLUGINS": "fakequeue,echo"}, "KSI_HOST_PLUGINS")):
        p = run_cli(run, site=fake_site, env=env)
        assert p.returncode == 0, p.stderr
        assert f"config table [fakeretry] is ignored: plugin 'fakeretry' (ksi-fake) is left out by {why}" in p.stderr
        assert json.loads(p.stdout)["status"] == "ok"


def test_an_unknown_plugin_name_is_an_error_in_both_variables(tmp_path, fake_site):
    for var in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE"):
        p = run_cli(["status", "--db", str(tmp_path / "k.db")], site=fake_site, env={var: "fakequeue,bogus"})
        assert p.returncode == 2 and f"{var} names 'bogus', which is not installed" in p.stderr, (var, p.stderr)


def test_run_under_an_80_column_terminal_keeps_the_bar_on_one_line(tmp_path, fake_site):
    """A pty of 80 columns as stderr: every redraw of the bar fits, and it is redrawn in place."""
    import fcntl
    import os
    import struct
    import subprocess
    import sys
    import termios

    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": f"slow {i}", "session_id": f"s{i % 40}",
                                           "agent_id": "an-agent-with-a-long-name"}) for i in range(400)])
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE", "COLUMNS", "LINES")}
    env.update(ONLY, PYTHONPATH=os.pathsep.join([str(fake_site), env.get("PYTHONPATH", "")]), TERM="xterm")
    p = subprocess.Popen([sys.executable, "-m", "ksi_host.cli", "run", str(f), "--out", str(tmp_path / "out.jsonl"),
                          "--db", str(tmp_path / "k.db"), "--concurrency", "16"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert p.wait(60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    lines = text.replace("\r\n", "\n").split("\n")
    bar_line, summary = lines[0], lines[1]
    assert summary.startswith("Done: 400 of 400 requests") and lines[2:] == [""]  # the bar took one line
    draws = [d for d in bar_line.split("\r") if d]
    assert len(draws) >= 3, draws  # redrawn in place
    assert all(len(d) <= 80 for d in draws), [d for d in draws if len(d) > 80]
    assert draws[-1].startswith("100%") and "400/400" in draws[-1]
    running = [int(m) for d in draws for m in re.findall(r"(\d+) running", d)]
    queued = [int(m) for d in draws for m in re.findall(r"(\d+) queued", d)]
    assert running and max(running) <= 16 and max(queued) > 16  # running is what runs; the rest waits, queued


def test_a_reader_that_leaves_early_is_not_a_programming_error(tmp_path, fake_site):
    """``ksi-host plugins | head -0``: stdout's reader is gone before the first line. Exit 141 (SIGPIPE's), no
    traceback, nothing on stderr."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader left
    env = {**os.environ, "PYTHONPATH": str(fake_site), "KSI_HOST_PLUGINS": "fakequeue,echo"}
    try:
        p = subprocess.run([sys.executable, "-m", "ksi_host.cli", "plugins"], stdout=write, stderr=subprocess.PIPE,
                           text=True, env=env, timeout=60)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (141, "")


def test_an_unknown_option_is_reported_with_its_commands_usage(tmp_path, fake_site):
    """``ksi-host run x --outt y``: the usage shown is run's (which has --out), not the top level's."""
    p = run_cli(["run", "x.jsonl", "--outt", "y.jsonl"], site=fake_site, env=ONLY)
    assert p.returncode == 2
    assert p.stderr.splitlines()[0].startswith("usage: ksi-host run ") and "--out RESULTS.jsonl" in p.stderr
    assert p.stderr.splitlines()[-1] == "ksi-host run: error: unrecognized arguments: --outt y.jsonl"
    p = run_cli(["--bogus"], site=fake_site, env=ONLY)  # no command: the top level's
    assert p.returncode == 2 and p.stderr.splitlines()[-1] == "ksi-host: error: unrecognized arguments: --bogus"


def test_a_results_file_that_cannot_be_written_is_a_usage_error_not_a_traceback(tmp_path, fake_site):
    f = write_batch(tmp_path, [json.dumps({"model": "echo", "prompt": "x"})])
    out = tmp_path / "no-such-dir" / "results.jsonl"
    p = run_cli(["run", str(f), "--out", str(out), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert (p.returncode, p.stderr) == (2, f"ksi-host: cannot write {out}: No such file or directory\n")
