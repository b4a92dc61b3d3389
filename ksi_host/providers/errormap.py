"""From an upstream HTTP failure to a :mod:`ksi_host.errors` error.

Provider plugins call :func:`error_for_status` with what the upstream answered
(status, headers, body) and get the error to raise:

=========================  ==========================================
HTTP 429                   RateLimited (``retry_after`` from the headers)
HTTP 408                   ProviderTimeout
HTTP 400/413 about context ContextWindowExceeded
HTTP 401, 403              AuthFailed
other HTTP 4xx             BadRequest
HTTP 5xx                   ProviderUnavailable
anything else              ProviderUnavailable (an error at a success status: a malformed answer)
=========================  ==========================================

:func:`timeout_error` and :func:`connection_error` cover failures with no
answer. :func:`parse_retry_after` reads ``retry-after-ms`` or ``Retry-After``
(delta seconds or an HTTP date). Messages pass through :func:`redact`, which
removes API keys, in every spelling an upstream may echo them in
(:func:`secret_forms`).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, quote_plus

from ..errors import (
    AuthFailed,
    BadRequest,
    ContextWindowExceeded,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)

MAX_MESSAGE = 500

_CONTEXT_CODES = frozenset({"context_length_exceeded", "context_window_exceeded", "string_above_max_length"})
_CONTEXT_TEXT = re.compile(
    r"context[ _-]?(length|window)|maximum context|prompt is too long|input is too long|too many (input )?tokens"
    r"|reduce the length of the messages",
    re.IGNORECASE,
)
# Things that look like API keys: OpenAI-style sk-..., "Bearer <token>", long opaque tokens after key=.
_KEYLIKE = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{4,})|(Bearer\s+[A-Za-z0-9._\-~+/=*]{6,})|((?:api[_-]?key|key)\s*[=:]\s*[A-Za-z0-9._\-*]{8,})",
    re.IGNORECASE,
)


PIECE = 12
"""Echoes cut short are caught too: no run of this many characters of a secret's spelling is left."""
_MIN_FORM = 8
_PERCENT = re.compile(r"%[0-9A-F]{2}")


def _base64_forms(data: bytes) -> set[str]:
    """``data`` in base64 (standard and URL-safe, with and without padding), and the characters
    that spell ``data`` alone inside any longer base64 text (``user:<key>`` with any user: at each
    of the three alignments, the complete 4-character groups that hold only bytes of ``data``)."""
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for prefix in (b"", b":"):  # the key alone; Basic with an empty user name
            text = encode(prefix + data).decode()
            forms |= {text, text.rstrip("=")}
        for offset in (1, 2):
            text = encode(b"\0" * offset + data).decode()
            forms.add(text[4:(offset + len(data)) // 3 * 4])
        forms.add(encode(data).decode()[: len(data) // 3 * 4])
    return forms


def secret_forms(secret: str) -> list[str]:
    """Every spelling of ``secret`` an error path may hold, longest first.

    The secret itself; JSON-escaped (``\\/`` for ``/`` too, as some encoders write it);
    percent-encoded (``quote`` and ``quote_plus``, ``/`` kept or not, upper- and
    lower-case hex); base64 (standard and URL-safe, with and without padding, and
    inside a Basic ``user:<key>`` credential whatever the user name). Derived
    spellings shorter than 8 characters are left out (they would mangle text).
    """
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret)[1:-1].replace("/", "\\/"),
             json.dumps(secret, ensure_ascii=False)[1:-1]}
    for encoded in (quote(secret, safe=""), quote(secret), quote_plus(secret), quote_plus(secret, safe="/")):
        forms |= {encoded, _PERCENT.sub(lambda m: m.group().lower(), encoded)}
    forms |= _base64_forms(secret.encode())
    return sorted((f for f in forms if f == secret or len(f) >= _MIN_FORM), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each of ``secrets`` and anything that looks like an API key replaced by ``***``.

    Each secret is removed in every spelling of :func:`secret_forms`, and so is any
    run of :data:`PIECE` characters of one (an echo cut short).
    """
    for s in secrets:
        if not s:
            continue
        forms = secret_forms(s)
        for form in forms:
            if form in text:
                text = text.replace(form, "***")
        for form in forms:
            for i in range(len(form) - PIECE + 1):
                piece = form[i:i + PIECE]
                if piece in text:
                    text = text.replace(piece, "***")
    return _KEYLIKE.sub("***", text)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        lname = name.lower()
        for k, v in headers.items():
            if k.lower() == lname:
                return v
    return value


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (None when absent or unreadable).

    ``Retry-After`` may be delta seconds (``"7"``, ``"1.5"``) or an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``), read against ``now`` (unix seconds;
    default the current time). A date in the past gives 0.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0 and value == value and value != float("inf"):
            return value
    return retry_after_seconds(_header(headers, "retry-after"), now=now)


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """One ``Retry-After`` value as seconds from ``now`` (None when absent or unreadable)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return None
    return seconds


def error_detail(body: Any) -> tuple[str | None, str | None]:
    """``(message, code)`` from an upstream error body (OpenAI's ``{"error": {...}}`` or similar).

    ``body`` may be bytes, a string or parsed JSON.
    """
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        text = body.strip()
        try:
            body = json.loads(text) if text[:1] in "{[" else text
        except ValueError:
            return text or None, None
        if isinstance(body, str):
            return body or None, None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            code = err.get("code") or err.get("type")
            return (str(msg) if msg is not None else None), (str(code) if code is not None else None)
        if isinstance(err, str):
            return err, None
    return None, None


def is_context_length(message: str | None, code: str | None = None) -> bool:
    """Does an upstream error say the prompt does not fit the model's context window?"""
    if code is not None and code.lower() in _CONTEXT_CODES:
        return True
    return bool(message) and _CONTEXT_TEXT.search(message) is not None  # type: ignore[arg-type]


def _message(provider: str | None, what: str, detail: str | None, secrets: Iterable[str | None]) -> str:
    text = f"{provider}: {what}" if provider else what
    if detail:
        text = f"{text}: {detail}"
    text = redact(text, secrets)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def error_for_status(
    status: int,
    *,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    message: str | None = None,
    provider: str | None = None,
    usage: Any = None,
    secrets: Iterable[str | None] = (),
    now: float | None = None,
) -> ProviderError:
    """The ksi_host error for an upstream answer with HTTP ``status`` (see the module table).

    ``message`` overrides the message found in ``body``. ``provider`` (the
    deployment name), ``status_code`` and ``usage`` are set on the error;
    ``retry_after`` too for a 429. ``secrets`` are removed from the message.
    """
    body_msg, code = error_detail(body)
    detail = message or body_msg
    secrets = tuple(secrets)
    common: dict[str, Any] = {"provider": provider, "status_code": status, "usage": usage}
    if status == 429:
        retry_after = parse_retry_after(headers, now=now)
        what = "rate limited (HTTP 429" + (f", retry after {retry_after:g}s)" if retry_after is not None else ")")
        return RateLimited(_message(provider, what, detail, secrets), retry_after=retry_after, **common)
    if status == 408:
        return ProviderTimeout(_message(provider, "timed out (HTTP 408)", detail, secrets), **common)
    if status in (400, 413, 422) and is_context_length(body_msg or message, code):
        return ContextWindowExceeded(_message(provider, f"context window exceeded (HTTP {status})", detail, secrets), **common)
    if status in (401, 403):
        what = "authentication failed" if status == 401 else "permission denied"
        return AuthFailed(_message(provider, f"{what} (HTTP {status})", detail, secrets), **common)
    if 400 <= status < 500:
        return BadRequest(_message(provider, f"bad request (HTTP {status})", detail, secrets), **common)
    if status >= 500:
        return ProviderUnavailable(_message(provider, f"unavailable (HTTP {status})", detail, secrets), **common)
    return ProviderUnavailable(_message(provider, f"malformed response (HTTP {status})", detail, secrets), **common)


def timeout_error(provider: str | None, timeout_s: float | None, detail: str | None = None, *,
                  secrets: Iterable[str | None] = ()) -> ProviderTimeout:
    """The upstream did not answer within ``timeout_s``."""
    what = f"no answer within {timeout_s:g}s" if timeout_s is not None else "timed out"
    return ProviderTimeout(_message(provider, what, detail, secrets), provider=provider, status_code=None)


def connection_error(provider: str | None, detail: str | None = None, *,
                     secrets: Iterable[str | None] = ()) -> ProviderUnavailable:
    """The connection failed (refused, reset, closed without an answer)."""
    return ProviderUnavailable(_message(provider, "connection failed", detail, secrets), provider=provider, status_code=None)


def context_window_error(provider: str | None, detail: str | None = None, *, status_code: int | None = 400,
                         secrets: Iterable[str | None] = ()) -> ContextWindowExceeded:
    """The prompt does not fit the model's context window (when the caller already knows it)."""
    return ContextWindowExceeded(_message(provider, "context window exceeded", detail, secrets), provider=provider,
                                 status_code=status_code)


def malformed_response(provider: str | None, detail: str | None = None, *,
                       secrets: Iterable[str | None] = ()) -> ProviderUnavailable:
    """The upstream answered something that is not a valid completion."""
    return ProviderUnavailable(_message(provider, "malformed response", detail, secrets), provider=provider, status_code=None)
