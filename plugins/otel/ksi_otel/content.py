"""Chat messages in the shape of the GenAI conventions' ``gen_ai.input.messages`` / ``gen_ai.output.messages``.

A request's messages follow the OpenAI chat schema (:mod:`ksi_host.chat`); the
conventions want ``{"role", "parts": [...]}`` with typed parts:

* text (a string content, or ``text`` parts) -> ``{"type": "text", "content": ...}``
* an assistant's ``tool_calls`` -> ``{"type": "tool_call", "id", "name", "arguments"}``
  (the arguments parsed from their JSON string when they parse)
* a ``tool`` message -> ``{"type": "tool_call_response", "id": tool_call_id, "response": content}``
* any other content part (``image_url``, ``input_audio``, ``file``, ``refusal``) is kept as it
  is, a generic part under its OpenAI type (``{"type": "image_url", "image_url": {...}}``).

Output messages carry ``finish_reason`` (left out when the upstream reported none).
Both are recorded as JSON strings: the SDK's span attributes take no nested values.
"""

from __future__ import annotations

import json
from typing import Any


def _text(content: Any) -> list[dict[str, Any]]:
    """The parts of an OpenAI ``content`` (a string, a list of parts, or None)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts = []
    for p in content:
        if p.get("type") == "text":
            parts.append({"type": "text", "content": p.get("text", "")})
        else:
            parts.append(dict(p))
    return parts


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    parts = []
    for c in calls or ():
        function = c.get("function") or {}
        parts.append({"type": "tool_call", "id": c.get("id"), "name": function.get("name"),
                      "arguments": _arguments(function.get("arguments"))})
    return parts


def message(m: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI chat message in the conventions' shape."""
    role = m.get("role")
    if role == "tool":
        content = m.get("content")
        if not isinstance(content, str) and content is not None:  # a list of text parts
            content = "".join(p.get("text", "") for p in content)
        return {"role": "tool", "parts": [{"type": "tool_call_response", "id": m.get("tool_call_id"), "response": content}]}
    parts = _text(m.get("content"))
    if m.get("refusal") is not None:
        parts.append({"type": "refusal", "content": m["refusal"]})
    parts += _tool_calls(m.get("tool_calls"))
    return {"role": role, "parts": parts}


def input_messages(messages: Any) -> str:
    """``gen_ai.input.messages``: every message sent, in order, as a JSON string."""
    return json.dumps([message(m) for m in messages], ensure_ascii=False)


def output_messages(answer: dict[str, Any], finish_reason: str | None) -> str:
    """``gen_ai.output.messages``: the one answer (the host asks for one choice), as a JSON string."""
    out = message(answer)
    if finish_reason is not None:
        out["finish_reason"] = finish_reason
    return json.dumps([out], ensure_ascii=False)
