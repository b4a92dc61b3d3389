"""Helpers shared by the ksi-provider-litellm tests."""

from __future__ import annotations

from typing import Any

from ksi_host import FailureDecision, OperationalError, hookimpl
from ksi_host.models import AttemptContext, CompletionRequest, UpstreamCall

KEY_ENV = "KSI_TEST_LITELLM_KEY"
SECRET_KEY = "sk-ksi-test-SECRET-0123456789abcdef"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def deployment(server: Any, name: str = "main", model: str = "gpt-test", upstream: str | None = None, **kw: Any) -> dict[str, Any]:
    """A ``[[litellm.deployments]]`` table pointing at the test server."""
    d: dict[str, Any] = {"name": name, "model": model, "litellm_model": upstream or f"openai/{model}",
                         "api_base": server.url, "api_key_env": KEY_ENV, "timeout_s": 5}
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


class UsageRecorder:
    """Records every ``ksi_record_usage`` call; optionally stores them (and nothing secret) in ``host.db``."""

    def __init__(self, store: bool = False) -> None:
        self.calls: list[UpstreamCall] = []
        self.store = store

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        if self.store:
            await host.db.migrate("test_usage", [
                "CREATE TABLE test_usage (request_id TEXT, provider TEXT, model TEXT, prompt INTEGER, "
                "completion INTEGER, total INTEGER, cost REAL, outcome TEXT)"])

    @hookimpl
    async def ksi_record_usage(self, host: Any, request: CompletionRequest, call: UpstreamCall) -> None:
        self.calls.append(call)
        if self.store:
            u = call.usage
            await host.db.execute("INSERT INTO test_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                call.request_id, call.provider, call.model, u.prompt_tokens, u.completion_tokens, u.total_tokens,
                u.cost_usd, call.outcome))
