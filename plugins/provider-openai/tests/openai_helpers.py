"""Helpers shared by the ksi-provider-openai tests."""

from __future__ import annotations

from typing import Any

from ksi_host.models import CompletionRequest
from ksi_host.testing.fakes import FailOver, FakeClock

__all__ = ["EVERY_PARAMETER", "KEY_ENV", "SECRET_KEY", "WEATHER", "FailOver", "FakeClock", "deployment", "request",
           "until"]

KEY_ENV = "KSI_TEST_OPENAI_KEY"
SECRET_KEY = "sk-ksi-test-SECRET-0123456789abcdef"


def deployment(server: Any, name: str = "main", model: str = "gpt-test", **kw: Any) -> dict[str, Any]:
    """A ``[[openai.deployments]]`` table pointing at the test server."""
    d: dict[str, Any] = {"name": name, "model": model, "api_base": server.url, "api_key_env": KEY_ENV, "timeout_s": 5}
    d.update(kw)
    return d


def request(model: str = "gpt-test", text: str = "hello there", **kw: Any) -> CompletionRequest:
    return CompletionRequest(model=model, messages=[{"role": "user", "content": text}], **kw)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}

EVERY_PARAMETER: dict[str, Any] = {
    "max_tokens": 50, "max_completion_tokens": 60, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n", "END"],
    "seed": 7, "presence_penalty": 0.1, "frequency_penalty": -0.2, "logit_bias": {"50256": -100, "13": 2.5},
    "logprobs": True, "top_logprobs": 2, "n": 1, "user": "agent-7", "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "w", "strict": True, "schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
    "reasoning_effort": "low", "verbosity": "high", "service_tier": "flex", "store": False, "modalities": ["text"],
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "sunny"},
    "web_search_options": {"search_context_size": "low"}, "prompt_cache_key": "weather-v1", "safety_identifier": "u-123",
}
"""A value for every chat parameter of ``ksi_host.chat.PARAMETERS`` (a test checks it names them all)."""


async def until(check: Any, timeout: float = 5.0) -> None:
    """Wait (polling) until ``check()`` is true: the test server runs on its own thread."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)
