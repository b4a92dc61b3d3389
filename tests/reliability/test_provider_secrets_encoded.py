"""An upstream echoing the key in every spelling: nothing of it in results, the database, stdout or stderr.

A key holding ``/`` and ``+`` (as base64-alphabet keys do), one real ``ksi-host run -vv`` with
``[host] log_level = "DEBUG"`` (the most logging there is) through the litellm plugin. The
server's first 401s echo the key it was sent, each in another spelling
(:data:`ksi_host.testing.server.ECHO_FORMS`: raw, JSON-escaped, percent-encoded with upper- and
lower-case hex, ``quote_plus``, base64 with and without padding, Basic ``user:key``). Before,
the percent-encoded echo left 36 of the key's 44 characters in results, the database and stderr.
Checked with :func:`ksi_host.testing.faults.leak` (any 12 characters of the key, in any of those
spellings) on stdout (the results), stderr and every file the run left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rel import deployment, env, ksi, results, run_args, session_requests, write_config, write_requests

from ksi_host.testing.faults import leak
from ksi_host.testing.server import ECHO_FORMS

KEY = "AbC/dEf+GhIjKlMnOpQrStUvWxYz0123456789/+ab="


def test_no_spelling_of_an_echoed_key_gets_anywhere(tmp_path: Path, server: Any) -> None:
    server.echo_auth = list(ECHO_FORMS)
    server.script(*["401"] * len(ECHO_FORMS))
    reqs = session_requests(20, 4, "enc-model")
    config = write_config(tmp_path / "ksi.toml", deployment("main", "enc-model", server.url),
                          deployment("backup", "enc-model", server.url), host={"log_level": "DEBUG"},
                          circuit={"failures_to_open": 50})
    db = tmp_path / "ksi.db"
    p = ksi(run_args(write_requests(tmp_path / "requests.jsonl", reqs), Path("-"), db, config, "-vv"),
            environ=env(key=KEY))
    assert p.returncode in (0, 1), p.stderr[-3000:]
    assert server.counts["401"] == len(ECHO_FORMS) and server._echoes == len(ECHO_FORMS)  # every spelling was sent
    assert {a.authorization for a in server.arrivals} == {f"Bearer {KEY}"}
    (tmp_path / "stdout.txt").write_text(p.stdout)
    final = results(tmp_path / "stdout.txt")
    assert len(final) == len(reqs)
    assert any(a["error_type"] == "AuthFailed" for r in final for a in r["attempts"]), final[0]
    assert "ksi_host.provider.litellm DEBUG" in p.stderr  # the debug logs were on
    for name, text in (("stdout", p.stdout), ("stderr", p.stderr)):
        assert leak(text, KEY) is None, f"a piece of the key is in {name}: {leak(text, KEY)}"
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert db in files
    for f in files:
        if f.name != "ksi.toml":
            assert leak(f.read_bytes(), KEY) is None, f"a piece of the key is in {f.name}"
