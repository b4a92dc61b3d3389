"""ksi_host.providers.errormap: upstream HTTP failures to ksi_host errors."""

from __future__ import annotations

import email.utils
import json

import pytest

from ksi_host.errors import (
    AuthFailed,
    BadRequest,
    ContextWindowExceeded,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ksi_host.providers.errormap import (
    connection_error,
    context_window_error,
    error_detail,
    error_for_status,
    is_context_length,
    malformed_response,
    parse_retry_after,
    redact,
    retry_after_seconds,
    timeout_error,
)

NOW = 1_700_000_000.0


def openai_body(message: str, code: str | None = None) -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


@pytest.mark.parametrize(
    ("status", "cls"),
    [(429, RateLimited), (408, ProviderTimeout), (400, BadRequest), (404, BadRequest), (422, BadRequest),
     (401, AuthFailed), (403, AuthFailed), (500, ProviderUnavailable), (502, ProviderUnavailable),
     (503, ProviderUnavailable), (529, ProviderUnavailable), (200, ProviderUnavailable)],
)
def test_status_table(status: int, cls: type) -> None:
    e = error_for_status(status, body=openai_body("upstream said no"), provider="dep-a")
    assert type(e) is cls
    assert e.provider == "dep-a" and e.status_code == status
    assert e.message.startswith("dep-a: ") and "upstream said no" in e.message


def test_context_length_by_code_and_by_message() -> None:
    e = error_for_status(400, body=openai_body("too long", "context_length_exceeded"), provider="p")
    assert type(e) is ContextWindowExceeded and isinstance(e, BadRequest)
    e = error_for_status(400, body=openai_body("This model's maximum context length is 8192 tokens."))
    assert type(e) is ContextWindowExceeded
    e = error_for_status(413, message="prompt is too long: 300000 tokens > 200000 maximum")
    assert type(e) is ContextWindowExceeded
    assert type(error_for_status(400, body=openai_body("bad temperature"))) is BadRequest
    assert is_context_length(None, "context_length_exceeded")
    assert not is_context_length("rate limit on tokens per min", None)


def test_retry_after_seconds_date_and_ms() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=NOW) == pytest.approx(30)
    past = email.utils.formatdate(NOW - 30, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now=NOW) == 0.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "junk", "retry-after": "9"}) == 9.0
    for bad in ("", "soon", "-3", "nan", "inf"):
        assert retry_after_seconds(bad) is None, bad
    assert parse_retry_after(None) is None and parse_retry_after({}) is None


def test_429_carries_retry_after() -> None:
    e = error_for_status(429, headers={"Retry-After": "12"}, body=openai_body("slow down"), provider="p")
    assert isinstance(e, RateLimited) and e.retry_after == 12.0 and e.retryable
    assert "retry after 12s" in e.message
    e = error_for_status(429, body="")
    assert isinstance(e, RateLimited) and e.retry_after is None


def test_error_detail_shapes() -> None:
    assert error_detail(openai_body("m", "c")) == ("m", "c")
    assert error_detail(b'{"error": "plain"}') == ("plain", None)
    assert error_detail({"detail": "x"}) == ("x", None)
    assert error_detail("<html>oops</html>") == ("<html>oops</html>", None)
    assert error_detail("{broken") == ("{broken", None)
    assert error_detail(None) == (None, None)


def test_secrets_are_redacted() -> None:
    key = "my-very-own-secret-value"
    e = error_for_status(401, body=openai_body(f"Incorrect API key provided: {key}"), provider="p", secrets=[key])
    assert key not in e.message and "***" in e.message
    assert "sk-" not in redact("key sk-abcdef123456 leaked")
    assert "tok123456" not in redact("Authorization: Bearer tok123456789")
    assert redact("nothing to hide") == "nothing to hide"


def test_messages_are_bounded() -> None:
    e = error_for_status(500, body=openai_body("x" * 5000), provider="p")
    assert len(e.message) <= 500 and e.message.endswith("...")


def test_no_answer_helpers() -> None:
    t = timeout_error("p", 2.5)
    assert isinstance(t, ProviderTimeout) and t.provider == "p" and "2.5s" in t.message
    c = connection_error("p", "refused")
    assert isinstance(c, ProviderUnavailable) and "refused" in c.message
    m = malformed_response("p", "no choices")
    assert isinstance(m, ProviderUnavailable) and "malformed" in m.message
    w = context_window_error("p", "too long")
    assert isinstance(w, ContextWindowExceeded) and w.status_code == 400
