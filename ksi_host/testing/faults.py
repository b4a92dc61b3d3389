"""What each failing fault of the test server must become in a provider plugin.

Every provider plugin maps upstream failures with :mod:`ksi_host.providers.errormap`, so that a
429 means the same to the retry plugin whichever plugin saw it. :data:`PROVIDER_FAULTS`
lists, for each fault mode of :class:`~ksi_host.testing.server.OpenAIServer` that fails
a call, the error class a provider's ``complete`` (and ``stream``) must raise and the HTTP
status the error must carry (None: no status). A provider plugin's tests take it as it is::

    @pytest.mark.parametrize(("fault", "error", "status"), PROVIDER_FAULTS)
    async def test_each_fault_maps(openai_server, fault, error, status): ...

The server's ``401`` can echo the key it was sent, in any of the spellings of
:data:`ksi_host.testing.server.ECHO_FORMS` (``echo_auth``). :func:`leak` is what a
redaction test checks a message (a result, a log, a database file) with: it finds
any run of :data:`PIECE` characters of the key, as it is and after decoding each
word every way an echo may have encoded it (percent-encoding, JSON escapes, base64
with or without padding, standard or URL-safe), so a test needs no knowledge of
the spelling::

    @pytest.mark.parametrize("how", ECHO_FORMS)
    async def test_an_echoed_key_is_redacted(openai_server, how):
        openai_server.echo_auth = how
        ...
        assert leak(error.message, KEY) is None
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from urllib.parse import unquote, unquote_plus

from ..errors import AuthFailed, BadRequest, ContextWindowExceeded, ProviderError, ProviderUnavailable, RateLimited

PROVIDER_FAULTS: list[tuple[str, type[ProviderError], int | None]] = [
    ("429", RateLimited, 429),
    ("500", ProviderUnavailable, 500),
    ("502", ProviderUnavailable, 502),
    ("503", ProviderUnavailable, 503),
    ("400", BadRequest, 400),
    ("context_length", ContextWindowExceeded, 400),
    ("401", AuthFailed, 401),
    ("403", AuthFailed, 403),
    ("malformed", ProviderUnavailable, None),
    ("disconnect", ProviderUnavailable, None),
    ("cut", ProviderUnavailable, None),
]

PIECE = 12
"""A run of this many characters of the key counts as a leak (masking that keeps 12 characters leaks too)."""

_WORDS = re.compile(r"[\s\"',;()\[\]{}<>]+")


def _decodings(word: str) -> Iterator[str]:
    yield word
    yield unquote(word)
    yield unquote_plus(word)
    yield word.replace("\\/", "/")
    for text in (word, word.replace("-", "+").replace("_", "/")):
        for pad in ("", "=", "=="):
            try:
                yield base64.b64decode(text + pad, validate=True).decode("latin-1")
            except (binascii.Error, ValueError):
                continue


def leak(text: str | bytes, key: str) -> str | None:
    """The first piece of ``key`` found in ``text`` (in any spelling), or None."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    pieces = {key[i:i + PIECE] for i in range(len(key) - PIECE + 1)}
    for piece in pieces:
        if piece in text:
            return piece
    for word in _WORDS.split(text):
        for found in _decodings(word.strip(".:")):
            for piece in pieces:
                if piece in found:
                    return piece
    return None


__all__ = ["PIECE", "PROVIDER_FAULTS", "leak"]
