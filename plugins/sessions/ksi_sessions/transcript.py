"""A conversation's messages as rows, their estimated size, and which earlier turns a request carries.

Pure functions, no database: :func:`to_row` and :func:`from_row` turn one
OpenAI-shaped message into the columns of ``session_messages`` and back (the
message comes back as it was given, but for ``"content": None`` added to an
assistant message that had no content),
:func:`estimate` sizes a message in tokens, and :func:`choose` picks the turns
a continuing request is sent with under ``[sessions] max_turns`` and
``max_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

SYSTEM_ROLES = ("system", "developer")
COLUMNS = ("role", "content", "content_parts", "name", "tool_calls", "tool_call_id", "refusal", "extra")
"""The columns of one message in ``session_messages`` (besides its place: session, turn, position, request)."""
_OWN_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_PART = 256
"""The estimate: a token per 4 characters of text (content, refusal, tool calls' names and arguments,
a tool call's id), 4 more per message (its role and framing), 256 per content part that is not text
(an image, audio, a file: what a provider charges for those varies too much to guess closer)."""


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def to_row(message: dict[str, Any]) -> tuple[Any, ...]:
    """The :data:`COLUMNS` of ``message``: text content in ``content``, a list of content parts as JSON in
    ``content_parts``, tool calls as JSON, and any other key (``audio``, ``cache_control``, ...) as a JSON
    object in ``extra``."""
    content = message.get("content")
    parts = _dump(list(content)) if isinstance(content, (list, tuple)) else None
    calls = message.get("tool_calls")
    extra = {k: v for k, v in message.items() if k not in _OWN_KEYS}
    return (
        message["role"],
        content if isinstance(content, str) else None,
        parts,
        message.get("name"),
        _dump([dict(c) for c in calls]) if calls is not None else None,
        message.get("tool_call_id"),
        message.get("refusal"),
        _dump(extra) if extra else None,
    )


def from_row(row: Any) -> dict[str, Any]:
    """The message a row of ``session_messages`` holds (``row``: a mapping with the :data:`COLUMNS`).

    ``content`` is always there (None for an assistant message that had none); other keys only when set."""
    message: dict[str, Any] = {"role": row["role"]}
    message["content"] = json.loads(row["content_parts"]) if row["content_parts"] is not None else row["content"]
    for key in ("name", "tool_call_id", "refusal"):
        if row[key] is not None:
            message[key] = row[key]
    if row["tool_calls"] is not None:
        message["tool_calls"] = json.loads(row["tool_calls"])
    if row["extra"] is not None:
        message.update(json.loads(row["extra"]))
    return message


def _chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def estimate(message: dict[str, Any]) -> int:
    """The estimated size of ``message`` in tokens (see :data:`TOKENS_PER_PART`)."""
    chars = _chars(message.get("content")) + _chars(message.get("refusal"))
    tokens = TOKENS_PER_MESSAGE
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "refusal"):
                chars += _chars(part.get(part["type"]))
            else:
                tokens += TOKENS_PER_PART
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        chars += _chars(call.get("id")) + _chars(fn.get("name")) + _chars(fn.get("arguments"))
    return tokens + -(-chars // CHARS_PER_TOKEN)


def leading_system(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The system (and developer) messages ``messages`` opens with."""
    found = []
    for m in messages:
        if m.get("role") not in SYSTEM_ROLES:
            break
        found.append(m)
    return found


@attrs.frozen
class TurnSize:
    """One earlier turn, as :func:`choose` needs it: its number and its estimated size in tokens."""

    turn: int
    tokens: int


def choose(turns: Sequence[TurnSize], system_tokens: int, *, max_turns: int | None,
           max_tokens: int | None) -> int | None:
    """The first turn a continuing request carries (it carries that one and every later one), or None for none.

    ``turns``: the conversation's earlier turns, oldest first. The newest turns are kept while there are at
    most ``max_turns`` of them and their estimated size is at most ``max_tokens``, counting the system
    messages that open the first turn (``system_tokens``; they are sent whatever the limits, before the kept
    turns, when the first turn itself is not kept).
    """
    first: int | None = None
    used = 0
    for count, t in enumerate(reversed(turns), start=1):
        used += t.tokens
        total = used + (system_tokens if t.turn != turns[0].turn else 0)
        if (max_turns is not None and count > max_turns) or (max_tokens is not None and total > max_tokens):
            break
        first = t.turn
    return first
