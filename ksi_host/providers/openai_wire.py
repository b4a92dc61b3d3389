"""The OpenAI chat-completions wire format: the request body, the answer and its streamed chunks.

For every provider plugin that talks to an OpenAI-compatible endpoint, or to a
client library that hands back that shape as plain data:

* :func:`request_body`: the JSON body of a request: ``model``, ``messages``,
  every chat parameter the request sets (:meth:`CompletionRequest.parameters
  <ksi_host.models.CompletionRequest.parameters>`, under the names the API uses)
  and ``provider_options`` merged in as they are (they win over a parameter of
  the same name; the keys the provider sets itself are refused);
* :func:`response_of`: a ``chat.completion`` object to a
  :class:`~ksi_host.models.ProviderResponse` (text, tool calls, finish reason,
  refusal, log probabilities, the upstream's model name and system fingerprint,
  usage with cached and reasoning tokens);
* :func:`delta_of`: one ``chat.completion.chunk`` to a :class:`~ksi_host.models.ChatDelta`;
* :func:`sse_data`: the ``data:`` payloads of a server-sent events byte stream.

Anything that is not what the format says raises ProviderUnavailable
(:func:`~ksi_host.providers.errormap.malformed_response`), never a
programming error: an upstream's bad answer is an operational failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from ..errors import BadRequest, ProviderError
from ..models import ChatDelta, CompletionRequest, ProviderResponse, Usage
from .errormap import error_for_status, malformed_response

MANAGED_KEYS = frozenset({"model", "messages", "stream", "stream_options"})
"""Body keys the provider sets itself: ``provider_options`` may not hold them."""

Cost = Callable[[int, int], "float | None"]
"""USD for a call of (prompt tokens, completion tokens), or None when unknown."""


def request_body(request: CompletionRequest, model: str, *, stream: bool = False,
                 provider: str | None = None) -> dict[str, Any]:
    """The chat-completions JSON body for ``request`` sent as ``model``.

    ``stream``: ask for server-sent events, with usage in a last chunk
    (``stream_options.include_usage``). Raises BadRequest naming the key when
    ``provider_options`` holds one of :data:`MANAGED_KEYS`.
    """
    body: dict[str, Any] = {"model": model, "messages": request.messages}  # a tuple of dicts: a JSON array
    body.update(request.parameters())
    options = request.provider_options
    if options:
        check_options(options, provider)
        body.update(options)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def check_options(options: dict[str, Any], provider: str | None = None) -> None:
    """BadRequest naming the first key of ``options`` that the provider sets itself (:data:`MANAGED_KEYS`)."""
    for key in options:
        if key in MANAGED_KEYS:
            who = f"{provider}: " if provider else ""
            raise BadRequest(f"{who}provider_options.{key} is set by the provider itself and may not be given "
                             "(nothing was sent)", provider=provider)


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _opt_count(details: Any, key: str) -> int | None:
    if not isinstance(details, dict):
        return None
    value = details.get(key)
    return value if type(value) is int and value >= 0 else None


def usage_of(u: Any, cost: Cost | None = None) -> Usage | None:
    """An OpenAI ``usage`` object as :class:`~ksi_host.models.Usage` (None when it is not an object).

    ``cached_tokens`` from ``prompt_tokens_details``, ``reasoning_tokens`` from
    ``completion_tokens_details`` (None when not reported). ``cost`` prices it.
    """
    if not isinstance(u, dict):
        return None
    prompt = _count(u.get("prompt_tokens"))
    completion = _count(u.get("completion_tokens"))
    total = _count(u.get("total_tokens")) or prompt + completion
    return Usage(prompt, completion, total, cost(prompt, completion) if cost is not None else None,
                 _opt_count(u.get("prompt_tokens_details"), "cached_tokens"),
                 _opt_count(u.get("completion_tokens_details"), "reasoning_tokens"))


def _finish(value: Any, provider: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise malformed_response(provider, f"finish_reason is {type(value).__name__}, not text")
    return "tool_calls" if value == "function_call" else value


def _text(value: Any, what: str, provider: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise malformed_response(provider, f"the answer's {what} is {type(value).__name__}, not text")


def _arguments(value: Any, provider: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # some servers send the arguments as an object: the API's shape is its JSON text
        return json.dumps(value, ensure_ascii=False)
    raise malformed_response(provider, f"a tool call's arguments are {type(value).__name__}, not text")


def _tool_calls(calls: Any, provider: str) -> tuple[dict[str, Any], ...] | None:
    if calls is None or calls == []:
        return None
    if not isinstance(calls, list):
        raise malformed_response(provider, f"tool_calls is {type(calls).__name__}, not a list")
    found = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
            raise malformed_response(provider, f"tool_calls[{i}] is not a function call with an id and a name")
        found.append({"id": call["id"], "type": call.get("type") or "function",
                      "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", ""), provider)}})
    return tuple(found)


def _logprobs(value: Any, provider: str) -> dict[str, Any] | None:
    """A choice's ``logprobs`` (an object whose ``content`` and ``refusal`` are lists or null, passed on as it is;
    None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise malformed_response(provider, f"the answer's logprobs is {type(value).__name__}, not an object")
    for key in ("content", "refusal"):
        entries = value.get(key)
        if entries is not None and not isinstance(entries, list):
            raise malformed_response(provider, f"the answer's logprobs.{key} is {type(entries).__name__}, not a list")
    return value


def response_of(payload: Any, *, provider: str, status: int = 200, cost: Cost | None = None,
                session_id: str | None = None) -> ProviderResponse:
    """A ``chat.completion`` object (parsed JSON) as a ProviderResponse; its first choice is the answer.

    An ``error`` object instead of choices (some gateways report errors at a
    success status) raises the error its ``status`` means; anything else that
    is not a completion raises ProviderUnavailable (malformed response).
    """
    if not isinstance(payload, dict):
        raise malformed_response(provider, f"the body is a JSON {type(payload).__name__}, not an object")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        if "error" in payload:
            raise error_for_status(status, body=payload, provider=provider)
        raise malformed_response(provider, "the answer has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise malformed_response(provider, "the answer's choice has no message")
    model = payload.get("model")
    fingerprint = payload.get("system_fingerprint")
    return ProviderResponse(
        _text(message.get("content"), "content", provider) or "",
        usage=usage_of(payload.get("usage"), cost),
        model=model if isinstance(model, str) else None,
        session_id=session_id,
        tool_calls=_tool_calls(message.get("tool_calls"), provider),
        finish_reason=_finish(choice.get("finish_reason"), provider),
        refusal=_text(message.get("refusal"), "refusal", provider),
        logprobs=_logprobs(choice.get("logprobs"), provider),
        system_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
    )


def _delta_calls(calls: Any, provider: str) -> tuple[dict[str, Any], ...] | None:
    if not calls:
        return None
    if not isinstance(calls, list):
        raise malformed_response(provider, f"a chunk's tool_calls is {type(calls).__name__}, not a list")
    pieces = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise malformed_response(provider, f"a chunk's tool_calls[{i}] is not an object")
        piece: dict[str, Any] = {"index": call.get("index", i)}
        if not isinstance(piece["index"], int):
            raise malformed_response(provider, f"a chunk's tool_calls[{i}].index is not a number")
        if call.get("id"):
            piece["id"] = call["id"]
        if call.get("type"):
            piece["type"] = call["type"]
        fn = call.get("function")
        if isinstance(fn, dict):
            part = {k: (fn[k] if k == "name" else _arguments(fn[k], provider)) for k in ("name", "arguments") if fn.get(k)}
            if part:
                piece["function"] = part
        pieces.append(piece)
    return tuple(pieces)


def delta_of(chunk: Any, *, provider: str, cost: Cost | None = None) -> ChatDelta | None:
    """One ``chat.completion.chunk`` (parsed JSON) as a ChatDelta, or None when it carries nothing (a
    role-only first chunk). An ``error`` object in the stream raises that error (ProviderUnavailable
    unless its code says otherwise)."""
    if not isinstance(chunk, dict):
        raise malformed_response(provider, f"a stream chunk is a JSON {type(chunk).__name__}, not an object")
    choices = chunk.get("choices")
    if "error" in chunk and not choices:
        raise _stream_error(chunk, provider)
    content = refusal = finish = calls = logprobs = None
    if choices:
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise malformed_response(provider, "a stream chunk's choices are not a list of objects")
        choice = choices[0]
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise malformed_response(provider, "a stream chunk's delta is not an object")
        content = _text(delta.get("content"), "content", provider) or None
        refusal = _text(delta.get("refusal"), "refusal", provider) or None
        calls = _delta_calls(delta.get("tool_calls"), provider)
        finish = _finish(choice.get("finish_reason"), provider)
        raw = choice.get("logprobs")
        if raw is not None:  # (asked for: most chunks carry none, and pay no call for it)
            logprobs = _logprobs(raw, provider)
    usage = usage_of(chunk.get("usage"), cost)
    if content is None and refusal is None and calls is None and finish is None and usage is None and logprobs is None:
        return None
    model = chunk.get("model")
    fingerprint = chunk.get("system_fingerprint")
    return ChatDelta(content, calls, finish, usage, model if isinstance(model, str) else None, refusal, logprobs,
                     fingerprint if isinstance(fingerprint, str) else None)


def _stream_error(chunk: dict[str, Any], provider: str) -> ProviderError:
    err = chunk["error"]
    code = err.get("code") if isinstance(err, dict) else None
    status = {"rate_limit_exceeded": 429, "context_length_exceeded": 400}.get(code, 503) if isinstance(code, str) else 503
    return error_for_status(status, body=chunk, provider=provider)


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event in a byte stream, as text (``[DONE]`` included).

    Events end at a blank line; several ``data:`` lines of one event are joined
    with newlines; comments (``:``) and other fields are skipped. A last event
    not ended by a blank line is not given (the stream was cut).
    """
    buffer = b""
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace"))


__all__ = ["MANAGED_KEYS", "check_options", "delta_of", "request_body", "response_of", "sse_data", "usage_of"]
