"""How many tokens an attempt may use, before it is sent: :func:`estimate`.

The estimate is what a token window reserves until the upstream reports the
call's usage. It is the prompt, estimated from its characters, plus the most
the answer may use:

* prompt: every character of text the request sends (message contents, tool
  call names and arguments, ``name`` fields, the ``tools`` schemas and the
  ``response_format``), divided by ``chars_per_token``, plus
  :data:`PER_MESSAGE` tokens per message and :data:`PER_REQUEST` per request
  (the framing OpenAI counts); a content part that is not text (an image,
  audio) counts :data:`PART_TOKENS`;
* completion: ``max_completion_tokens``, else ``max_tokens``, else the
  configured ``default_max_tokens``.

English prose runs about 4 characters per token; code, other scripts and
numbers run fewer. ``chars_per_token = 1`` never estimates low for a BPE
tokenizer (a token holds at least one character).
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from ksi_host.models import CompletionRequest

PER_MESSAGE = 4
"""Tokens of one message's framing (its role and separators)."""
PER_REQUEST = 3
"""Tokens that prime the answer."""
PART_TOKENS = 765
"""Tokens counted for a content part that is not text (an image at high detail, 1024x1024, is 765)."""


@attrs.frozen(slots=True)
class Estimate:
    """An attempt's estimated tokens: ``prompt`` and the most the ``completion`` may take."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _content_chars(content: Any) -> tuple[int, int]:
    """(characters of text, parts that are not text) of one message's content."""
    if isinstance(content, str):
        return len(content), 0
    chars = parts = 0
    if isinstance(content, (list, tuple)):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                chars += len(part["text"])
            elif isinstance(part, dict) and isinstance(part.get("refusal"), str):
                chars += len(part["refusal"])
            else:
                parts += 1
    return chars, parts


def prompt_tokens(request: CompletionRequest, chars_per_token: float) -> int:
    """The estimated prompt tokens of ``request`` (see the module docstring)."""
    chars = parts = 0
    for m in request.messages:
        c, p = _content_chars(m.get("content"))
        chars += c
        parts += p
        name = m.get("name")
        if isinstance(name, str):
            chars += len(name)
        calls = m.get("tool_calls")
        if calls:
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    chars += len(str(function.get("name") or "")) + len(str(function.get("arguments") or ""))
    if request.tools:
        chars += len(json.dumps(request.tools))
    if request.response_format:
        chars += len(json.dumps(request.response_format))
    return math.ceil(chars / chars_per_token) + PER_MESSAGE * len(request.messages) + PER_REQUEST + PART_TOKENS * parts


def estimate(request: CompletionRequest, chars_per_token: float, default_max_tokens: int) -> Estimate:
    """The tokens one attempt of ``request`` may use: its prompt and the most its answer may take."""
    completion = request.max_completion_tokens or request.max_tokens or default_max_tokens
    return Estimate(prompt_tokens(request, chars_per_token), completion)
