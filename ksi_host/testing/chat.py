"""Chat values for a provider plugin's tests: a tool, and a value for every chat parameter.

A provider plugin sends every parameter of a request as it is (or refuses the request before sending,
naming what its deployment cannot take). Its tests send :data:`EVERY_PARAMETER` through the test server
(:mod:`ksi_host.testing.server`, which keeps each body) and compare what arrived::

    result = await host.complete({"model": "gpt-test", "prompt": "weather in Paris", **EVERY_PARAMETER})
    body = openai_server.arrivals[0].body
    for name, value in EVERY_PARAMETER.items():
        assert body[name] == value, name

:func:`until` waits for something the server (on its own thread) has done.
"""

from __future__ import annotations

from typing import Any

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
