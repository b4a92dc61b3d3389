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

MAX_ECHO = 200
"""How much of the last user message a mock answer repeats."""


def last_user_text(request: CompletionRequest) -> str:
    for m in reversed(request.messages):
        if m.get("role") == "user":
            return _text(m.get("content"))
    return ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(str(p.get("text", "")) for p in content or () if isinstance(p, dict))


def example(schema: Any, text: str, depth: int = 0) -> Any:
    """A JSON value of ``schema`` (a JSON schema): every property filled in, strings ``text``."""
    if not isinstance(schema, dict) or depth > 16:
        return text
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example(schema[key][0], text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        return {name: example(sub, text, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [example(schema.get("items"), text, depth + 1)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, text)  # type: ignore[arg-type]


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
        text = f"mock response to the tool result: {_text(last.get('content'))[:MAX_ECHO]}"
    else:
        text = f"mock response to: {last_user_text(request)[:MAX_ECHO]}"
    fmt = request.response_format or {}
    if fmt.get("type") == "json_object":
        return json.dumps({"response": text})
    if fmt.get("type") == "json_schema":
        return json.dumps(example((fmt.get("json_schema") or {}).get("schema", {"type": "object"}), text))
    return text


def mock_response(lit: Any, request: CompletionRequest, model: str) -> Any:
    """What litellm's ``mock_response`` is given: the answer text, or a whole ``ModelResponse`` for a tool call."""
    tool = tool_called(request)
    if tool is None:
        return text_of(request)
    arguments = json.dumps(example(tool.get("parameters") or {"type": "object"}, last_user_text(request)[:MAX_ECHO]))
    seed = json.dumps([list(request.messages), tool.get("name"), arguments], sort_keys=True).encode()  # same request, same id
    call = {"id": "call_mock_" + hashlib.sha256(seed).hexdigest()[:24], "type": "function",
            "function": {"name": str(tool.get("name")), "arguments": arguments}}
    prompt = sum(len(_text(m.get("content")).split()) + 3 for m in request.messages)
    completion = max(1, len(arguments.split()))
    return lit.ModelResponse(
        model=model,
        choices=[{"index": 0, "finish_reason": "tool_calls",
                  "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
        usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    )


__all__ = ["example", "last_user_text", "mock_response", "text_of", "tool_called"]
