"""The token estimate of an attempt."""

from __future__ import annotations

from ksi_limits.estimate import PART_TOKENS, PER_MESSAGE, PER_REQUEST, estimate

from ksi_host import CompletionRequest


def test_prompt_characters_and_the_answer_bound() -> None:
    r = CompletionRequest("m", [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 41}],
                          max_tokens=100)
    e = estimate(r, 4.0, 1024)
    assert (e.prompt, e.completion, e.total) == (21 + 2 * PER_MESSAGE + PER_REQUEST, 100, 132)


def test_the_answer_bound_prefers_max_completion_tokens_then_the_default() -> None:
    m = [{"role": "user", "content": "hi"}]
    assert estimate(CompletionRequest("m", m, max_tokens=50, max_completion_tokens=70), 4.0, 9).completion == 70
    assert estimate(CompletionRequest("m", m), 4.0, 9).completion == 9


def test_parts_tool_calls_and_tools_count() -> None:
    r = CompletionRequest("m", [
        {"role": "user", "content": [{"type": "text", "text": "abcd"},
                                     {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12345678"},
    ], tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    tools_chars = len('[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]')
    chars = 4 + (1 + 7) + 8 + tools_chars
    assert estimate(r, 1.0, 10).prompt == chars + 3 * PER_MESSAGE + PER_REQUEST + PART_TOKENS
