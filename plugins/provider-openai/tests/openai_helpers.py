"""Helpers shared by the ksi-provider-openai tests."""

from __future__ import annotations

from typing import Any

from ksi_host import FailureDecision, OperationalError, hookimpl
from ksi_host.models import AttemptContext, CompletionRequest

KEY_ENV = "KSI_TEST_OPENAI_KEY"
SECRET_KEY = "sk-ksi-test-SECRET-0123456789abcdef"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def deployment(server: Any, name: str = "main", model: str = "gpt-test", **kw: Any) -> dict[str, Any]:
    """A ``[[openai.deployments]]`` table pointing at the test server."""
    d: dict[str, Any] = {"name": name, "model": model, "api_base": server.url, "api_key_env": KEY_ENV, "timeout_s": 5}
    d.update(kw)
    return d


def request(model: str = "gpt-test", text: str = "hello there", **kw: Any) -> CompletionRequest:
    return CompletionRequest(model=model, messages=[{"role": "user", "content": text}], **kw)


class FailOver:
    """A tiny failure policy: retryable errors and AuthFailed move to another deployment at once; the rest give up."""

    def __init__(self, max_attempts: int = 5) -> None:
        self.max_attempts = max_attempts
        self.seen: list[tuple[str | None, str]] = []

    @hookimpl
    def ksi_handle_failure(self, error: OperationalError, attempt: AttemptContext) -> FailureDecision:
        self.seen.append((attempt.provider, error.type))
        if attempt.number < self.max_attempts and (error.retryable or error.type == "AuthFailed"):
            return FailureDecision.retry(0.0, switch_provider=attempt.provider is not None)
        return FailureDecision.give_up(error)
