"""The OpenAI shapes at the HTTP edge: a chat-completions call to a :class:`~ksi_host.CompletionRequest`,
a :class:`~ksi_host.CompletionResult` to a ``chat.completion`` (or its chunks), an error to OpenAI's error
body and an HTTP status.

What the host adds rides in headers, so the stock ``openai`` client sends it with ``default_headers`` or
``extra_headers``: :data:`HEADER_FIELDS`, and the request id (``Idempotency-Key`` or ``X-KSI-Request-Id``),
scoped to the calling client (:func:`scoped_id`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from ksi_host import CompletionRequest, CompletionResult, Usage, ValidationError
from ksi_host.chat import PARAMETERS
from ksi_host.models import new_request_id

HEADER_FIELDS = {
    "X-KSI-Session-Id": "session_id",
    "X-KSI-Agent-Id": "agent_id",
    "X-KSI-Originator-Agent-Id": "originator_agent_id",
    "X-KSI-Purpose": "purpose",
    "X-KSI-Priority": "priority",
}
"""Request headers -> the CompletionRequest field each sets."""

_HEADER_OF = {field: header for header, field in HEADER_FIELDS.items()}
PASSED_AS_OPTIONS = ("prompt_cache_retention", "prompt_cache_options", "moderation")
"""Parameters of OpenAI's chat completions (the ``openai`` client's ``create`` takes them) that the host has no field
for: a request carries them in ``provider_options``, so they reach the provider as they are (an OpenAI-compatible
upstream gets them in its body, as given) instead of being refused as unknown."""
BODY_KEYS = frozenset(PARAMETERS) | {"model", "messages", "metadata", "stream", "stream_options", *PASSED_AS_OPTIONS}
"""What a chat-completions body may hold: the OpenAI parameters the host takes (:data:`ksi_host.chat.PARAMETERS`),
``model``, ``messages``, ``metadata``, ``stream``, ``stream_options`` and :data:`PASSED_AS_OPTIONS`."""

MAX_ID = 200
"""The longest request id a client may give (``Idempotency-Key``, ``X-KSI-Request-Id``)."""

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(data: Any) -> bytes:
    return _dumps(data).encode()


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with ``status``.

    ``retry`` sets ``x-should-retry`` (the ``openai`` client obeys it: True for a full queue or a stopping
    server, False for a final stored result); ``retry_after`` (seconds) sets ``Retry-After``; ``request_id`` (the
    visible id of the request it answers) sets :func:`id_headers`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, retry: bool | None = None, retry_after: int | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry = retry
        self.retry_after = retry_after
        self.request_id = request_id

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        h = id_headers(self.request_id) if self.request_id is not None else {}
        if self.retry is not None:
            h["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after is not None:
            h["Retry-After"] = str(self.retry_after)
        return h


def id_headers(visible: str) -> dict[str, str]:
    """The headers that name the request an answer is for: ``X-KSI-Request-Id``, and ``x-request-id``, where the
    ``openai`` client reads a response's ``_request_id`` (and an ``APIStatusError``'s ``request_id``), as from
    OpenAI's own answers."""
    return {"X-KSI-Request-Id": visible, "x-request-id": visible}


# -- requests ------------------------------------------------------------------------------------------


def scoped_id(client: str | None, visible: str) -> str:
    """The stored request id of the id ``visible`` a client gave: ``<client>:<visible>`` (client names hold
    no ``:``), so two clients' keys never meet; with no clients configured, ``visible`` itself."""
    return visible if client is None else f"{client}:{visible}"


def visible_id(client: str | None, stored: str) -> str:
    """The inverse of :func:`scoped_id`."""
    return stored if client is None else stored.removeprefix(f"{client}:")


def given_id(headers: Mapping[str, str]) -> str | None:
    """The request id the caller chose: ``Idempotency-Key``, else ``X-KSI-Request-Id`` (both: they must agree)."""
    key = headers.get("Idempotency-Key")
    rid = headers.get("X-KSI-Request-Id")
    if key is not None and rid is not None and key != rid:
        raise ApiError(400, "Idempotency-Key and X-KSI-Request-Id differ: give one, or the same value in both",
                       param="Idempotency-Key", code="invalid_request_id")
    value = key if key is not None else rid
    if value is None:
        return None
    name = "Idempotency-Key" if key is not None else "X-KSI-Request-Id"
    if not value or len(value) > MAX_ID or not all(" " < c <= "~" for c in value):
        raise ApiError(400, f"{name} must be 1 to {MAX_ID} printable ASCII characters without spaces",
                       param=name, code="invalid_request_id")
    return value


_MESSAGE_ECHOES = frozenset({"annotations", "parsed"})


def without_response_fields(messages: Any) -> Any:
    """``messages`` without the response fields the ``openai`` client's own message objects carry when an agent
    appends one back as it came (``messages.append(completion.choices[0].message)`` after ``.parse()`` or
    ``.stream()``): ``annotations`` and ``parsed`` on an assistant message, ``index`` on its tool calls (a stream's),
    ``parsed_arguments`` on their functions. OpenAI takes such a message and ignores them; they are not part of a
    request (``ChatCompletionAssistantMessageParam``), so they are dropped here, and any other unknown key stays an
    error naming it. The list (and a message) is copied only when it holds one."""
    if not isinstance(messages, list):
        return messages
    copied: list[Any] | None = None
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            bare = _assistant_without_response_fields(m)
            if bare is not m:
                copied = copied if copied is not None else list(messages)
                copied[i] = bare
    return messages if copied is None else copied


def _assistant_without_response_fields(m: dict[str, Any]) -> dict[str, Any]:
    bare = {k: v for k, v in m.items() if k not in _MESSAGE_ECHOES} if not _MESSAGE_ECHOES.isdisjoint(m) else m
    calls = m.get("tool_calls")
    if isinstance(calls, list) and any(isinstance(c, dict) and ("index" in c or (
            isinstance(c.get("function"), dict) and "parsed_arguments" in c["function"])) for c in calls):
        bare_calls = []
        for c in calls:
            if isinstance(c, dict):
                c = {k: v for k, v in c.items() if k != "index"}
                if isinstance(c.get("function"), dict):
                    c["function"] = {k: v for k, v in c["function"].items() if k != "parsed_arguments"}
            bare_calls.append(c)
        bare = {**bare, "tool_calls": bare_calls}
    return bare


def parse_chat(body: Any, headers: Mapping[str, str], client: str | None, agent_id: str | None
               ) -> tuple[CompletionRequest, bool, bool, str]:
    """A chat-completions call as ``(request, stream, include_usage, visible id)``.

    ``client``: the calling client's name (None: no clients configured); ``agent_id``: the agent id the
    client is configured with (the ``X-KSI-Agent-Id`` header does not override it). Raises ApiError 400
    naming the field (``param``; a header's name for what came in a header)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got a JSON {type(body).__name__}")
    unknown = [k for k in body if k not in BODY_KEYS]
    if unknown:
        name = str(unknown[0]).encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate, escaped
        raise ApiError(400, f"{name}: unknown or unsupported parameter", param=name, code="unknown_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true or false", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise ApiError(400, "stream_options: must be an object with include_usage", param="stream_options")
        include_usage = options.get("include_usage") is True
    visible = given_id(headers) or new_request_id()
    data = {k: v for k, v in body.items() if v is not None and k != "stream" and k != "stream_options"}
    if "messages" in data:
        data["messages"] = without_response_fields(data["messages"])
    options = {k: data.pop(k) for k in PASSED_AS_OPTIONS if k in data}
    if options:
        data["provider_options"] = options
    data["request_id"] = scoped_id(client, visible)
    for header, field in HEADER_FIELDS.items():
        value = headers.get(header)
        if value is not None:
            data[field] = value
    if agent_id is not None:
        data["agent_id"] = agent_id
    try:
        request = CompletionRequest.from_dict(data)
    except ValidationError as e:
        raise invalid(e) from None
    return request, bool(stream), include_usage, visible


def invalid(e: ValidationError) -> ApiError:
    """A ValidationError as a 400 naming the field (the header's name for a field that came in one); a request
    id given again with a different request as a 422 (``Idempotency-Key`` reused)."""
    root = e.field.split(".", 1)[0].split("[", 1)[0]
    if root == "request_id":
        return ApiError(422, f"this request id was used before with a different request: {e.reason}",
                        param="Idempotency-Key", code="idempotency_key_reused", retry=False)
    field = e.field
    if root == "provider_options" and field.startswith(PASSED_AS_OPTIONS, len("provider_options.")):
        field = field.removeprefix("provider_options.")  # (it came as a parameter of its own)
        return ApiError(400, f"{field}: {e.reason}", param=field, code="invalid_value")
    return ApiError(400, e.message, param=_HEADER_OF.get(root, field), code="invalid_value")


# -- answers --------------------------------------------------------------------------------------------


def usage_of(usage: Usage) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                         "total_tokens": usage.total_tokens}
    if usage.cached_tokens is not None:
        u["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return u


def completion_id(visible: str) -> str:
    return f"chatcmpl-{visible}"


def created_of(result: CompletionResult | None) -> int:
    if result is not None and (result.submitted_at or result.started_at):
        return int(result.submitted_at or result.started_at or 0)
    return int(time.time())


def completion(result: CompletionResult, visible: str, requested_model: str) -> dict[str, Any]:
    """An ``ok`` result as a ``chat.completion`` object."""
    message = result.message or {"role": "assistant", "content": result.text or ""}
    return {
        "id": completion_id(visible),
        "object": "chat.completion",
        "created": created_of(result),
        "model": result.model or requested_model,
        "choices": [{"index": 0, "message": message, "logprobs": result.logprobs,
                     "finish_reason": result.finish_reason or ("tool_calls" if message.get("tool_calls") else "stop")}],
        "usage": usage_of(result.usage),
        "system_fingerprint": result.system_fingerprint,
    }


def chunk(visible: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None,
          logprobs: dict[str, Any] | None = None, system_fingerprint: str | None = None) -> bytes:
    """One server-sent event of a stream: a ``chat.completion.chunk`` (``logprobs``: its piece's log probabilities;
    ``system_fingerprint``: the upstream's, as OpenAI's chunks each say it)."""
    return b"data: " + dumps({
        "id": completion_id(visible), "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": system_fingerprint,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }) + b"\n\n"


def usage_chunk(visible: str, created: int, model: str, usage: Usage, system_fingerprint: str | None = None) -> bytes:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return b"data: " + dumps({"id": completion_id(visible), "object": "chat.completion.chunk", "created": created,
                              "model": model, "system_fingerprint": system_fingerprint, "choices": [],
                              "usage": usage_of(usage)}) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def error_event(error: ApiError) -> bytes:
    """A failure after the first chunk: an ``error`` event (the ``openai`` client raises it), and no ``[DONE]``."""
    return b"data: " + dumps(error.body()) + b"\n\n"


# -- errors ---------------------------------------------------------------------------------------------

ERRORS: dict[str, tuple[int, str, str | None]] = {
    # error type: (HTTP status, OpenAI error type, code)
    "ValidationError": (400, "invalid_request_error", "invalid_value"),
    "BadRequest": (400, "invalid_request_error", "upstream_bad_request"),
    "ContextWindowExceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "NoProviderError": (404, "invalid_request_error", "model_not_found"),
    "Cancelled": (409, "invalid_request_error", "request_cancelled"),
    "RateLimited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "BudgetExceeded": (429, "insufficient_quota", "insufficient_quota"),
    "AuthFailed": (502, "upstream_error", "upstream_auth_failed"),
    "ProviderUnavailable": (502, "upstream_error", "upstream_unavailable"),
    "ProviderError": (502, "upstream_error", "upstream_error"),
    "DatabaseError": (503, "server_error", "database_error"),
    "ProviderTimeout": (504, "timeout_error", "upstream_timeout"),
    "DeadlineExceeded": (504, "timeout_error", "deadline_exceeded"),
}
"""How a request's final error answers: see the README's table. Any other error type: 500 ``server_error``."""


def _mapping(kind: str) -> tuple[int, str, str | None]:
    """The row of :data:`ERRORS` for an error type, or for its nearest base class the host defines
    (``ConsumerGone`` is a ``Cancelled``); 500 for a type the host does not know."""
    if kind in ERRORS:
        return ERRORS[kind]
    from ksi_host import errors, streaming

    cls = getattr(errors, kind, None) or getattr(streaming, kind, None)
    if isinstance(cls, type):
        for base in cls.__mro__:
            if base.__name__ in ERRORS:
                return ERRORS[base.__name__]
    return 500, "server_error", None


def result_error(result: CompletionResult, retry_after_s: int, visible: str | None = None) -> ApiError:
    """A failed (or cancelled) result as an ApiError (naming the request ``visible`` in :func:`id_headers`). The host
    already retried it as its policy says, and a retry with the same request id gets this same stored result:
    ``x-should-retry: false``."""
    info = result.error or {"type": "OperationalError", "message": f"the request ended {result.status}"}
    kind = info.get("type") or "OperationalError"
    status, type_, code = _mapping(kind)
    return ApiError(status, f"{kind}: {info.get('message') or kind}", type_, code=code, retry=False,
                    retry_after=retry_after_s if status == 429 else None, request_id=visible)
