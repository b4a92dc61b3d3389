"""The API key never reaches the database, results, errors or logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from ksi_provider_litellm.config import LitellmConfig, LitellmDeployment
from ksi_provider_litellm.plugin import build_pool
from provider_helpers import KEY_ENV, SECRET_KEY, FailOver, FakeClock, UsageRecorder, deployment, request

from ksi_host import AuthFailed
from ksi_host.providers import CircuitConfig
from ksi_host.testing.faults import leak
from ksi_host.testing.server import ECHO_FORMS


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


KEYS = ["sk-ksi-test/SECRET+0123456789/abcdef+ghijkl=", "AbC/dEf+GhIjKlMnOpQrStUvWxYz0123456789/+ab="]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("how", list(ECHO_FORMS))
async def test_an_echoed_key_is_redacted_in_every_spelling(
    openai_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, key: str, how: str
) -> None:
    """A key holding "/" or "+" echoed percent-encoded left 36 of its 44 characters in results, db and stderr."""
    monkeypatch.setenv(KEY_ENV, key)
    openai_server.echo_auth = how
    openai_server.script("401")
    pool = build_pool(LitellmConfig(deployments=[LitellmDeployment(**deployment(openai_server))],
                                    circuit=CircuitConfig(failures_to_open=1)), clock=FakeClock())
    p = pool.get("main")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthFailed) as info:
            await p.complete(request(), timeout_s=5)
    assert openai_server.arrivals[0].authorization == f"Bearer {key}"  # sent, and echoed back
    assert "***" in info.value.message
    for text in (info.value.message, p.breaker.last_error, caplog.text):
        assert leak(text, key) is None, text
