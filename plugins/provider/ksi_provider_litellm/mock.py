"""The answers of the built-in ``mock`` deployment (``mock/<anything>``), offline and deterministic.

litellm's ``mock_response`` returns them as if an upstream had answered, whole or
streamed:

* a request with ``tools`` (``tool_choice`` not ``none``) whose last message is not
  a tool result: a call of the first tool (or the one ``tool_choice`` names), with
  arguments built from its parameter schema (every property filled in; strings are
  the last user message), ``finish_reason: "tool_calls"``;
* a last message that is a tool result: ``mock response to the tool result: <it>``;
* otherwise ``mock response to: <the last user message>``;
* ``response_format`` ``json_object``: ``{"response": <that text>}``; ``json_schema``:
  a JSON value of the schema.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ksi_host import CompletionRequest
from ksi_host.chat import content_text, schema_example

MAX_ECHO = 200
"""How much of the last user message a mock answer repeats."""


def last_user_text(request: CompletionRequest) -> str:
    for m in reversed(request.messages):
        if m.get("role") == "user":
            return content_text(m.get("content"))
    return ""


def tool_called(request: CompletionRequest) -> dict[str, Any] | None:
    """The function a mock answer calls, or None when it answers with text."""
    if not request.tools or request.tool_choice == "none" or (request.messages[-1].get("role") == "tool"):
        return None
    tools = [t["function"] for t in request.tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not tools:
        return None
    choice = request.tool_choice
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return next((t for t in tools if t.get("name") == choice["function"].get("name")), tools[0])
    return tools[0]


def text_of(request: CompletionRequest) -> str:
    """The text of a mock answer (see the module docstring)."""
    last = request.messages[-1]
    if last.get("role") == "tool":
        text = f"mock response to the tool result: {content_text(last.get('content'))[:MAX_ECHO]}"
    else:
        text = f"mock response to: {last_user_text(request)[:MAX_ECHO]}"
    fmt = request.response_format or {}
    if fmt.get("type") == "json_object":
        return json.dumps({"response": text})
    if fmt.get("type") == "json_schema":
        return json.dumps(schema_example((fmt.get("json_schema") or {}).get("schema", {"type": "object"}), text))
    return text


def mock_response(lit: Any, request: CompletionRequest, model: str) -> Any:
    """What litellm's ``mock_response`` is given: the answer text, or a whole ``ModelResponse`` for a tool call."""
    tool = tool_called(request)
    if tool is None:
        return text_of(request)
    arguments = json.dumps(schema_example(tool.get("parameters") or {"type": "object"}, last_user_text(request)[:MAX_ECHO]))
    seed = json.dumps([list(request.messages), tool.get("name"), arguments], sort_keys=True).encode()  # same request, same id
    call = {"id": "call_mock_" + hashlib.sha256(seed).hexdigest()[:24], "type": "function",
            "function": {"name": str(tool.get("name")), "arguments": arguments}}
    prompt = sum(len(content_text(m.get("content")).split()) + 3 for m in request.messages)
    completion = max(1, len(arguments.split()))
    return lit.ModelResponse(
        model=model,
        choices=[{"index": 0, "finish_reason": "tool_calls",
                  "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
        usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    )


__all__ = ["last_user_text", "mock_response", "text_of", "tool_called"]
