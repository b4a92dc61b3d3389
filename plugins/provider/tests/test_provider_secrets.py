"""The API key never reaches the database, results, errors or logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from provider_helpers import SECRET_KEY, FailOver, UsageRecorder, request


def files_of(db_path: Path) -> list[Path]:
    return [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]


async def test_key_never_written_anywhere_even_when_the_upstream_echoes_it(
    lit_host: Any, openai_server: Any, ksi_db_path: Path, caplog: Any, capsys: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    openai_server.script("401", "429", "500", "ok")
    openai_server.echo_auth = True  # the 401 body repeats the Authorization header, like a careless upstream
    results = []
    async with lit_host(FailOver(max_attempts=1), UsageRecorder(store=True), config={"host": {"log_level": "DEBUG"}}) as host:
        for _ in range(4):
            results.append(await host.complete(request()))
        status = await host.status()
        infos = await host.providers()
    assert [a.authorization for a in openai_server.arrivals] == [f"Bearer {SECRET_KEY}"] * 4  # it was sent...
    assert [r.status for r in results] == ["error", "error", "error", "ok"]
    assert SECRET_KEY in openai_server.arrivals[0].to_dict()["authorization"]
    # ...and it is nowhere else
    texts = [repr(r.to_dict()) for r in results] + [repr(status), repr(infos), caplog.text]
    captured = capsys.readouterr()
    texts += [captured.out, captured.err]
    for text in texts:
        assert SECRET_KEY not in text
        assert SECRET_KEY[10:] not in text
    assert "***" in results[0].error["message"]  # the echoed key was redacted
    files = files_of(ksi_db_path)
    assert files
    for f in files:
        data = f.read_bytes()
        assert SECRET_KEY.encode() not in data
        assert SECRET_KEY[10:].encode() not in data
