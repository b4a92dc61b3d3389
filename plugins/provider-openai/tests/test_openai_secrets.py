"""An upstream echoing the key, in any spelling, never gets it into an error, a circuit or the logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from openai_helpers import KEY_ENV, request

from ksi_host import AuthFailed
from ksi_host.testing.faults import leak
from ksi_host.testing.server import ECHO_FORMS

KEYS = ["sk-ksi-test/SECRET+0123456789/abcdef+ghijkl=", "AbC/dEf+GhIjKlMnOpQrStUvWxYz0123456789/+ab="]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("how", list(ECHO_FORMS))
async def test_an_echoed_key_is_redacted_in_every_spelling(
    make_provider: Any, openai_server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    key: str, how: str,
) -> None:
    monkeypatch.setenv(KEY_ENV, key)
    openai_server.echo_auth = how
    openai_server.script("401")
    p = make_provider(circuit={"failures_to_open": 1})
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthFailed) as info:
            await p.complete(request(), timeout_s=5)
    assert openai_server.arrivals[0].authorization == f"Bearer {key}"  # sent, and echoed back
    assert "***" in info.value.message
    for text in (info.value.message, p.breaker.last_error, caplog.text):
        assert leak(text, key) is None, text


async def test_through_the_host_results_status_and_database(
    oa_host: Any, openai_server: Any, monkeypatch: pytest.MonkeyPatch, ksi_db_path: Any
) -> None:
    key = KEYS[1]
    monkeypatch.setenv(KEY_ENV, key)
    openai_server.echo_auth = list(ECHO_FORMS)
    openai_server.script(*["401"] * len(ECHO_FORMS))
    async with oa_host(table={"circuit": {"failures_to_open": 1, "cooldown_s": 0}}) as host:
        results = [await host.complete({"model": "gpt-test", "prompt": "hi"}) for _ in ECHO_FORMS]
        status = await host.status()
        await host.pm.get_plugin("Plugin").circuits.flush()
    assert [r.error["type"] for r in results] == ["AuthFailed"] * len(ECHO_FORMS)
    for text in [repr(r.to_dict()) for r in results] + [repr(status)]:
        assert leak(text, key) is None, text
    for f in ksi_db_path.parent.iterdir():
        if f.name.startswith(ksi_db_path.name):
            assert leak(f.read_bytes(), key) is None, f.name
