"""Redaction: an API key echoed by an upstream in any spelling never survives into an error message.

An upstream echoing the key percent-encoded (a key holding ``/`` or ``+``) left 36 of 44
characters in results, the database and stderr. Each spelling of
:data:`ksi_host.testing.server.ECHO_FORMS` is tested alone, then through the real error path:
the local server's 401 echoing the key it received, read over HTTP and mapped by
``error_for_status``. (The litellm and openai plugins' own tests do the same through their calls.)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from ksi_host.providers.errormap import error_for_status, redact, secret_forms
from ksi_host.testing.faults import leak
from ksi_host.testing.server import ECHO_FORMS, echo_form

KEYS = [
    "sk-ksi-test/SECRET+0123456789/abcdef+ghijkl=",  # 44 characters, "/" and "+" in it
    "AbC/dEf+GhIjKlMnOpQrStUvWxYz0123456789/+ab=",  # no "sk-" to catch it by its look
]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("how", list(ECHO_FORMS))
def test_every_spelling_of_the_key_is_redacted(key: str, how: str) -> None:
    echoed = f"Incorrect API key provided: {echo_form(key, how)}. You can find your API key at example.invalid."
    assert leak(echoed, key) is not None  # the check sees the spelling (so the test is not vacuous)
    text = redact(echoed, [key])
    assert leak(text, key) is None, text
    assert "***" in text and text.startswith("Incorrect API key provided: ")


@pytest.mark.parametrize("key", KEYS)
def test_an_echo_cut_short_is_redacted_too(key: str) -> None:
    for cut in (14, 20, 30):
        text = redact(f"key {key[:cut]}... was refused; {echo_form(key, 'quote')[:cut + 6]}...", [key])
        assert leak(text, key) is None, text


def test_the_spellings() -> None:
    key = KEYS[0]
    forms = secret_forms(key)
    assert forms[0] == max(forms, key=len) and key in forms
    assert "sk-ksi-test%2FSECRET%2B0123456789%2Fabcdef%2Bghijkl%3D" in forms
    assert "sk-ksi-test%2fSECRET%2b0123456789%2fabcdef%2bghijkl%3d" in forms
    assert "sk-ksi-test\\/SECRET+0123456789\\/abcdef+ghijkl=" in forms
    assert redact("short", ["ab"]) == "short" and redact("x ab y", ["ab"]) == "x *** y"  # a short key: itself only
    assert redact("nothing here", [None, ""]) == "nothing here"


def _post(url: str, key: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url + "/chat/completions", method="POST",
                                 data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("how", list(ECHO_FORMS))
def test_the_servers_echo_through_the_error_path(openai_server: Any, key: str, how: str) -> None:
    openai_server.echo_auth = how
    openai_server.script("401")
    status, headers, body = _post(openai_server.url, key)
    assert status == 401 and leak(body, key) is not None  # the server did echo it
    error = error_for_status(status, headers=headers, body=body, provider="main", secrets=(key,))
    assert error.type == "AuthFailed" and "***" in error.message
    assert leak(error.message, key) is None, error.message


def test_the_server_uses_a_list_of_spellings_in_turn(openai_server: Any) -> None:
    key = KEYS[1]
    openai_server.echo_auth = ["quote", "basic"]
    openai_server.script("401", "401", "401")
    bodies = [_post(openai_server.url, key)[2].decode() for _ in range(3)]
    assert echo_form(key, "quote") in bodies[0] and echo_form(key, "basic") in bodies[1]
    assert echo_form(key, "quote") in bodies[2]
    with pytest.raises(ValueError, match="unknown echo form"):
        echo_form(key, "rot13")
