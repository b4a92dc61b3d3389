"""Helpers shared by the ksi-provider-litellm tests."""

from __future__ import annotations

from typing import Any

from ksi_host import hookimpl
from ksi_host.models import CompletionRequest, UpstreamCall
from ksi_host.testing.chat import WEATHER
from ksi_host.testing.fakes import FailOver, FakeClock

__all__ = ["KEY_ENV", "SECRET_KEY", "WEATHER", "FailOver", "FakeClock", "UsageRecorder", "deployment",
           "request"]

KEY_ENV = "KSI_TEST_LITELLM_KEY"
SECRET_KEY = "sk-ksi-test-SECRET-0123456789abcdef"


def deployment(server: Any, name: str = "main", model: str = "gpt-test", upstream: str | None = None, **kw: Any) -> dict[str, Any]:
    """A ``[[litellm.deployments]]`` table pointing at the test server."""
    d: dict[str, Any] = {"name": name, "model": model, "litellm_model": upstream or f"openai/{model}",
                         "api_base": server.url, "api_key_env": KEY_ENV, "timeout_s": 5}
    d.update(kw)
    return d


def request(model: str = "gpt-test", text: str = "hello there", **kw: Any) -> CompletionRequest:
    return CompletionRequest(model=model, messages=[{"role": "user", "content": text}], **kw)


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
        if call.usage is None:  # a call that reported no usage
            return
        self.calls.append(call)
        if self.store:
            u = call.usage
            await host.db.execute("INSERT INTO test_usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                call.request_id, call.provider, call.model, u.prompt_tokens, u.completion_tokens, u.total_tokens,
                u.cost_usd, call.outcome))
