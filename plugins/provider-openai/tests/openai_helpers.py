"""Helpers shared by the ksi-provider-openai tests."""

from __future__ import annotations

from typing import Any

from ksi_host.models import CompletionRequest
from ksi_host.testing.fakes import FailOver, FakeClock

__all__ = ["KEY_ENV", "SECRET_KEY", "FailOver", "FakeClock", "deployment", "request"]

KEY_ENV = "KSI_TEST_OPENAI_KEY"
SECRET_KEY = "sk-ksi-test-SECRET-0123456789abcdef"


def deployment(server: Any, name: str = "main", model: str = "gpt-test", **kw: Any) -> dict[str, Any]:
    """A ``[[openai.deployments]]`` table pointing at the test server."""
    d: dict[str, Any] = {"name": name, "model": model, "api_base": server.url, "api_key_env": KEY_ENV, "timeout_s": 5}
    d.update(kw)
    return d


def request(model: str = "gpt-test", text: str = "hello there", **kw: Any) -> CompletionRequest:
    return CompletionRequest(model=model, messages=[{"role": "user", "content": text}], **kw)
