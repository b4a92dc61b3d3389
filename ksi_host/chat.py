"""The OpenAI chat-completions schema at the edge: messages, tools and parameters.

:func:`check_messages` and the checks in :data:`PARAMETERS` raise
:class:`~ksi_host.errors.ValidationError` naming the field and why
(``messages[2].tool_call_id: required for role tool``). They follow the
OpenAI chat schema: roles ``system``, ``developer``, ``user``, ``assistant``
(``content`` may be null when it has ``tool_calls``) and ``tool`` (with
``tool_call_id``); ``content`` is a string or a list of parts (``text``,
``image_url``, ``input_audio``, ``file``, and ``refusal`` for an assistant).
``cache_control`` is accepted on messages and parts (providers such as
Anthropic's, through litellm, read it); any other unknown key is an error.

JSON documents a request carries (tool schemas, ``response_format``,
``provider_options``, ...) are checked without recursion: at most
:data:`MAX_DEPTH` levels of nesting, string keys, text that is valid Unicode.

:func:`needs` says what a request asks of a provider (the parameters it sets
and the content it holds), so the host can skip deployments that cannot do it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .errors import ValidationError

MAX_DEPTH = 64
"""How deeply a request's JSON documents may nest (arrays and objects inside each other).

Deeper input is refused naming the field: one line of a batch must not be able to exhaust the
interpreter's recursion limit anywhere down the line (JSON encoders, providers' clients)."""

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = {  # content part type -> its required object key
    "text": "text", "image_url": "image_url", "input_audio": "input_audio", "file": "file", "refusal": "refusal",
}
_PARTS_OF = {  # which part types each role may send
    "system": {"text"}, "developer": {"text"}, "tool": {"text"},
    "user": {"text", "image_url", "input_audio", "file"}, "assistant": {"text", "refusal"},
}
_KEYS_OF = {  # the keys a message of each role may hold
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal", "audio", "function_call"},
    "tool": {"role", "content", "tool_call_id"},
}
_EXTENSIONS = {"cache_control"}
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # (the openai client's ReasoningEffort)
VERBOSITIES = ("low", "medium", "high")


def fail(field: str, reason: str) -> None:
    raise ValidationError(field, reason)


# -- JSON documents -------------------------------------------------------------------------


def _bad_text(value: str) -> str | None:
    """Why ``value`` cannot be stored or sent as UTF-8 (a lone surrogate, which JSON's ``\\ud800``
    escapes can carry), or None when it can."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text: it holds the lone surrogate {value[e.start]!r} at index {e.start}"
    return None


def check_text(field: str, value: str) -> None:
    reason = _bad_text(value)
    if reason is not None:
        fail(field, reason)


def check_document(field: str, value: Any) -> None:
    """``value`` is JSON data: objects with string keys, arrays, strings (valid Unicode), finite numbers,
    booleans, null; nested at most :data:`MAX_DEPTH` deep. Walked with a stack, not recursion."""
    stack: list[tuple[str, Any, int]] = [(field, value, 1)]
    while stack:
        where, v, depth = stack.pop()
        if isinstance(v, str):
            check_text(where, v)
        elif isinstance(v, bool) or v is None or isinstance(v, int):
            continue
        elif isinstance(v, float):
            if not math.isfinite(v):
                fail(where, f"must be a finite number, got {v!r}")
        elif isinstance(v, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                fail(where, f"nests deeper than {MAX_DEPTH} levels (the limit of a request's JSON documents)")
            if isinstance(v, dict):
                for k, item in v.items():
                    if not isinstance(k, str):
                        fail(where, f"keys must be strings, got {k!r}")
                    check_text(where, k)
                    stack.append((f"{where}.{k}", item, depth + 1))
            else:
                stack.extend((f"{where}[{i}]", item, depth + 1) for i, item in enumerate(v))
        else:
            fail(where, f"must be JSON data, got a {type(v).__name__}")


def _object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(field, f"must be an object, got {_kind(value)}")
    return value


def _string(field: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        fail(field, f"must be a {'' if empty else 'non-empty '}string, got {_kind(value)}")
    check_text(field, value)
    return value


def _identifier(field: str, value: Any) -> str:
    """A function or schema name as the OpenAI schema allows it: 1 to 64 letters, digits, ``_`` or ``-``."""
    name = _string(field, value)
    if not _FUNCTION_NAME.match(name):
        fail(field, f"must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    return name


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", tuple: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), f"{value!r}")


def _only(field: str, value: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in value if k not in allowed and k not in _EXTENSIONS)
    if unknown:
        fail(f"{field}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


# -- messages -------------------------------------------------------------------------------


def check_messages(value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value:
        fail("messages", "must be a non-empty list of messages (objects with 'role'), or give 'prompt'")
    for i, m in enumerate(value):
        _message(f"messages[{i}]", m)


def _message(field: str, m: Any) -> None:
    if not isinstance(m, dict):
        fail(field, f"must be an object with 'role' and 'content', got {_kind(m)}")
    role = m.get("role")
    if role == "function":
        fail(f"{field}.role", "'function' messages are deprecated in the OpenAI schema: use role 'tool' with tool_call_id")
    if not isinstance(role, str) or role not in _KEYS_OF:
        fail(f"{field}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    _only(field, m, _KEYS_OF[role])
    if "name" in m:
        _string(f"{field}.name", m["name"])
    content = m.get("content")
    if role == "assistant":
        calls = m.get("tool_calls")
        if calls is not None:
            _tool_calls(f"{field}.tool_calls", calls)
        if content is None and not calls and m.get("refusal") is None and m.get("audio") is None \
                and m.get("function_call") is None:
            fail(f"{field}.content", "required for an assistant message without tool_calls")
        for key in ("refusal",):
            if m.get(key) is not None:
                _string(f"{field}.{key}", m[key], empty=True)
        for key in ("audio", "function_call"):
            if m.get(key) is not None:
                check_document(f"{field}.{key}", _object(f"{field}.{key}", m[key]))
    elif content is None:
        fail(f"{field}.content", f"required for role {role}")
    if role == "tool":
        if "tool_call_id" not in m:
            fail(f"{field}.tool_call_id", "required for role tool")
        _string(f"{field}.tool_call_id", m["tool_call_id"])
    if content is None:
        return
    if isinstance(content, str):
        if not content.isascii():
            check_text(f"{field}.content", content)
    elif isinstance(content, (list, tuple)):
        for j, part in enumerate(content):
            _part(f"{field}.content[{j}]", part, _PARTS_OF[role])
    else:
        fail(f"{field}.content", f"must be a string or a list of content parts, got {_kind(content)}")
    if "cache_control" in m:
        check_document(f"{field}.cache_control", m["cache_control"])


def _part(field: str, part: Any, allowed: set[str]) -> None:
    p = _object(field, part)
    kind = p.get("type")
    if not isinstance(kind, str) or kind not in PART_TYPES:
        fail(f"{field}.type", f"must be one of {', '.join(PART_TYPES)}, got {kind!r}")
    if kind not in allowed:
        fail(f"{field}.type", f"a {kind!r} part is not allowed here (allowed: {', '.join(sorted(allowed))})")
    key = PART_TYPES[kind]
    _only(field, p, {"type", key})
    if key not in p:
        fail(f"{field}.{key}", f"required for a {kind!r} part")
    if kind in ("text", "refusal"):
        _string(f"{field}.{key}", p[key], empty=True)
    else:
        inner = _object(f"{field}.{key}", p[key])
        if kind == "image_url":
            _string(f"{field}.image_url.url", inner.get("url"))
        elif kind == "input_audio":
            _string(f"{field}.input_audio.data", inner.get("data"))
            _string(f"{field}.input_audio.format", inner.get("format"))
        check_document(f"{field}.{key}", inner)
    if "cache_control" in p:
        check_document(f"{field}.cache_control", p["cache_control"])


def _tool_calls(field: str, calls: Any) -> None:
    if not isinstance(calls, (list, tuple)):
        fail(field, f"must be a list of tool calls, got {_kind(calls)}")
    for k, call in enumerate(calls):
        where = f"{field}[{k}]"
        c = _object(where, call)
        _only(where, c, {"id", "type", "function"})
        _string(f"{where}.id", c.get("id"))
        if c.get("type", "function") != "function":
            fail(f"{where}.type", f"must be 'function', got {c.get('type')!r}")
        fn = _object(f"{where}.function", c.get("function"))
        _only(f"{where}.function", fn, {"name", "arguments"})
        _string(f"{where}.function.name", fn.get("name"))
        _string(f"{where}.function.arguments", fn.get("arguments"), empty=True)


# -- parameters -----------------------------------------------------------------------------


def _number(lo: float, hi: float) -> Callable[[str, Any], None]:
    def check(field: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            fail(field, f"must be a number from {lo:g} to {hi:g} or null, got {v!r}")
    return check


def _int_range(lo: int, hi: int) -> Callable[[str, Any], None]:
    def check(field: str, v: Any) -> None:
        if type(v) is not int or not lo <= v <= hi:
            fail(field, f"must be an integer from {lo:,} to {hi:,} or null, got {v!r}")
    return check


def _boolean(field: str, v: Any) -> None:
    if not isinstance(v, bool):
        fail(field, f"must be true, false or null, got {v!r}")


def _one_of(*choices: str) -> Callable[[str, Any], None]:
    def check(field: str, v: Any) -> None:
        if v not in choices:
            fail(field, f"must be one of {', '.join(choices)} or null, got {v!r}")
    return check


def _text(field: str, v: Any) -> None:
    _string(field, v)


def _document(field: str, v: Any) -> None:
    check_document(field, _object(field, v))


def _n(field: str, v: Any) -> None:
    if v != 1 or isinstance(v, bool):
        fail(field, f"only 1 is supported (one choice per request; submit several requests for more), got {v!r}")


def _stop(field: str, v: Any) -> None:
    if isinstance(v, str):
        _string(field, v)
        return
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 4:
        fail(field, "must be a string or a list of 1 to 4 strings, or null")
    for i, s in enumerate(v):
        _string(f"{field}[{i}]", s)


def _logit_bias(field: str, v: Any) -> None:
    for k, bias in _object(field, v).items():
        if not isinstance(k, str) or not k.isdigit():
            fail(field, f"keys must be token ids (digits), got {k!r}")
        _number(-100, 100)(f"{field}.{k}", bias)


def _tools(field: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        fail(field, "must be a non-empty list of tools, or null")
    names: set[str] = set()
    for i, tool in enumerate(v):
        where = f"{field}[{i}]"
        t = _object(where, tool)
        if t.get("type") != "function":
            fail(f"{where}.type", f"must be 'function', got {t.get('type')!r}")
        _only(where, t, {"type", "function"})
        fn = _object(f"{where}.function", t.get("function"))
        _only(f"{where}.function", fn, {"name", "description", "parameters", "strict"})
        name = _identifier(f"{where}.function.name", fn.get("name"))
        if name in names:
            fail(f"{where}.function.name", f"{name!r} names two tools")
        names.add(name)
        if fn.get("description") is not None:
            _string(f"{where}.function.description", fn["description"], empty=True)
        if fn.get("parameters") is not None:
            _document(f"{where}.function.parameters", fn["parameters"])
        if fn.get("strict") is not None:
            _boolean(f"{where}.function.strict", fn["strict"])


def _tool_choice(field: str, v: Any) -> None:
    if isinstance(v, str):
        _one_of("none", "auto", "required")(field, v)
        return
    c = _object(field, v)
    kind = c.get("type")
    if kind == "function":
        _only(field, c, {"type", "function"})
        _string(f"{field}.function.name", _object(f"{field}.function", c.get("function")).get("name"))
    elif kind == "allowed_tools":
        _document(field, c)
    else:
        fail(f"{field}.type", f"must be 'function' or 'allowed_tools' (or give none, auto, required), got {kind!r}")


def _response_format(field: str, v: Any) -> None:
    f = _object(field, v)
    kind = f.get("type")
    if kind in ("text", "json_object"):
        _only(field, f, {"type"})
    elif kind == "json_schema":
        _only(field, f, {"type", "json_schema"})
        schema = _object(f"{field}.json_schema", f.get("json_schema"))
        _only(f"{field}.json_schema", schema, {"name", "description", "schema", "strict"})
        _identifier(f"{field}.json_schema.name", schema.get("name"))
        if schema.get("schema") is not None:
            _document(f"{field}.json_schema.schema", schema["schema"])
        if schema.get("strict") is not None:
            _boolean(f"{field}.json_schema.strict", schema["strict"])
    else:
        fail(f"{field}.type", f"must be text, json_object or json_schema, got {kind!r}")


def _modalities(field: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)) or not v or any(m not in ("text", "audio") for m in v):
        fail(field, f"must be a list of 'text' and 'audio', got {v!r}")


PARAMETERS: dict[str, Callable[[str, Any], None]] = {
    "max_tokens": _int_range(1, 10**9),
    "max_completion_tokens": _int_range(1, 10**9),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "stop": _stop,
    "seed": _int_range(-(2**63), 2**63 - 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logit_bias": _logit_bias,
    "logprobs": _boolean,
    "top_logprobs": _int_range(0, 20),
    "n": _n,
    "user": _text,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "response_format": _response_format,
    "reasoning_effort": _one_of(*REASONING_EFFORTS),
    "verbosity": _one_of(*VERBOSITIES),
    "service_tier": _text,
    "store": _boolean,
    "modalities": _modalities,
    "audio": _document,
    "prediction": _document,
    "web_search_options": _document,
    "prompt_cache_key": _text,
    "safety_identifier": _text,
}
"""The chat-completions parameters a request may set, each with its check; providers send the ones set
(not None) in the upstream body under the same names."""


def check_parameters(values: dict[str, Any]) -> None:
    """Check the parameters that are set; ``top_logprobs`` needs ``logprobs``."""
    for name, value in values.items():
        if value is not None:
            PARAMETERS[name](name, value)
    if values.get("top_logprobs") is not None and not values.get("logprobs"):
        fail("top_logprobs", "needs logprobs = true")


def needs(parameters: dict[str, Any], messages: Any) -> frozenset[str]:
    """What a request asks of a provider: the names of the parameters it sets, ``tools`` when its
    conversation holds tool calls or tool results, and the content part types it sends (``image_url``, ...)."""
    found = {name for name, value in parameters.items() if value is not None}
    for m in messages:
        if m.get("role") == "tool" or m.get("tool_calls"):
            found.add("tools")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            found.update(p["type"] for p in content if p.get("type") not in ("text", "refusal"))
    return frozenset(found)


def content_text(content: Any) -> str:
    """The text of a message's ``content``: the string, or its parts' ``text`` joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def schema_example(schema: Any, text: str, depth: int = 0) -> Any:
    """A JSON value of ``schema`` (a JSON schema), every property filled in, strings ``text``: what an offline
    model (the test server, the litellm plugin's ``mock/``) answers a tool's parameters or a ``json_schema`` with."""
    if not isinstance(schema, dict) or depth > 16:
        return text
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema_example(schema[key][0], text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        return {name: schema_example(sub, text, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [schema_example(schema.get("items"), text, depth + 1)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, text)  # type: ignore[arg-type]
