"""OpenAI's Batch file format for ``ksi-host run``: input lines to requests, results to output lines.

An input line, as OpenAI's Batch API reads it::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o-mini", "messages": [...], ...}}

``custom_id`` becomes the request id (unique within the file: a rerun finds its stored result);
``body`` is the chat-completions request (every parameter of :data:`ksi_host.chat.PARAMETERS`,
``metadata`` kept as the request's metadata); ``stream: true`` is refused (a batch does not
stream). The host's own fields (``session_id``, ``agent_id``, ``originator_agent_id``,
``purpose``, ``priority``, ``timeout_s``, ``continue_session``, ``provider_options``) may ride in
an optional top-level ``"ksi"`` object, so ``body`` stays exactly what OpenAI's schema holds.

An output line, as OpenAI's Batch API writes it::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "q1", "body": {<a chat.completion object>}},
     "error": null}

A failed request: one the upstream (or the host's checks) refused gets the HTTP status OpenAI
would answer with (400 bad input, 401 a refused key, 404 a model nothing serves, 429 a rate
limit or a spent budget) and OpenAI's error body, ``{"error": {"message", "type", "param",
"code"}}``; one that got no answer (a timeout, cancelled, an upstream down) gets ``response:
null``. Either way ``error`` is ``{"code", "message"}`` (with ``line`` and ``param`` for a bad
line, as OpenAI's batch validation errors have them): ``error`` is null exactly when the request
succeeded. (OpenAI leaves ``error`` null for a request answered with an error status; a reader
written for OpenAI's files that checks ``response.status_code`` reads these the same way.)
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..chat import PARAMETERS
from ..errors import ValidationError
from ..models import CompletionRequest, CompletionResult
from .formats import Rejected, build, is_batch_line, line_request_id, load_json, root, writable

URL = "/v1/chat/completions"
METHOD = "POST"
ENVELOPE = ("custom_id", "method", "url", "body")
EXTENSION = "ksi"
KSI_FIELDS = ("session_id", "agent_id", "originator_agent_id", "purpose", "priority", "timeout_s", "continue_session",
              "provider_options")
"""The request fields that are the host's own, not OpenAI's: they go in the line's ``ksi`` object."""
BODY_KEYS = frozenset(("model", "messages", "metadata", "stream", "stream_options", *PARAMETERS))

# error type -> (HTTP status OpenAI would answer with or None for no answer, OpenAI's error type, code)
ERRORS: dict[str, tuple[int | None, str | None, str]] = {
    "ValidationError": (400, "invalid_request_error", "invalid_request"),
    "BadRequest": (400, "invalid_request_error", "invalid_request"),
    "ContextWindowExceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "AuthFailed": (401, "invalid_request_error", "invalid_api_key"),
    "NoProviderError": (404, "invalid_request_error", "model_not_found"),
    "RateLimited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "BudgetExceeded": (429, "insufficient_quota", "insufficient_quota"),
    "ProviderTimeout": (None, None, "request_timeout"),
    "DeadlineExceeded": (None, None, "request_timeout"),
    "Cancelled": (None, None, "batch_cancelled"),
    "ProviderUnavailable": (None, None, "server_error"),
}
OTHER_ERROR: tuple[int | None, str | None, str] = (None, None, "server_error")


def _hash(request_id: str) -> str:
    return hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class OpenAIBatchFormat:
    """The ``openai-batch`` line format: see the module docstring."""

    name = "openai-batch"
    id_field = "custom_id"

    def __init__(self, detected_from: int | None = None) -> None:
        self.detected_from = detected_from  # the line the format was detected from (None: --format)

    # -- input ----------------------------------------------------------------------------

    def parse(self, lineno: int, text: str) -> CompletionRequest | Rejected:
        fallback = line_request_id(lineno, text)
        try:
            data = load_json(lineno, text)
        except ValidationError as e:
            return Rejected(fallback, e, own_id=False)
        line = data if isinstance(data, dict) else {}
        custom_id = line.get("custom_id")
        own = writable(custom_id) if isinstance(custom_id, str) and custom_id.strip() else None
        body = line.get("body") if isinstance(line.get("body"), dict) else {}
        ksi = line.get(EXTENSION) if isinstance(line.get(EXTENSION), dict) else {}
        known = (own or fallback, writable(body.get("model")), writable(ksi.get("session_id")))

        def reject(field: str, reason: str) -> Rejected:
            return Rejected(known[0], ValidationError(field, reason, line=lineno), known[1], known[2], own is not None)

        if not isinstance(data, dict):
            return reject("line", f"must be a JSON object ({', '.join(ENVELOPE)}), got {type(data).__name__}")
        if not is_batch_line(data) and "url" not in data and "method" not in data:
            how = f"detected from line {self.detected_from}" if self.detected_from else "chosen with --format"
            return reject("format", f"a KSI request line (no {', '.join(ENVELOPE)}) in an OpenAI Batch file (the format "
                          f"was {how}; one file holds one format)")
        unknown = sorted(str(k) for k in data if k not in ENVELOPE and k != EXTENSION)
        if unknown:
            return reject(unknown[0], f"unknown key of a Batch line (known: {', '.join(ENVELOPE)}, and {EXTENSION} for "
                          "the host's own fields)")
        if custom_id is None:
            return reject("custom_id", "is required: a string unique within the file (it becomes the request id)")
        if own is None:
            return reject("custom_id", f"must be a non-empty string of valid Unicode, got {_show(custom_id)}")
        if data.get("method") != METHOD:
            return reject("method", f"must be {METHOD}, got {_show(data.get('method'))}")
        if data.get("url") != URL:
            return reject("url", f"must be {URL} (the one endpoint served here), got {_show(data.get('url'))}")
        if not isinstance(data.get("body"), dict):
            return reject("body", f"must be an object (the chat-completions request), got {_show(data.get('body'))}")
        if EXTENSION in data and not isinstance(data[EXTENSION], dict):
            return reject(EXTENSION, f"must be an object of the host's own fields ({', '.join(KSI_FIELDS)})")
        for key in ksi:
            if key not in KSI_FIELDS:
                hint = "; it goes in body" if key in BODY_KEYS else ""
                return reject(f"{EXTENSION}.{key}", f"not one of the host's own fields ({', '.join(KSI_FIELDS)}){hint}")
        for key in body:
            if key not in BODY_KEYS:
                if key in KSI_FIELDS or key == "request_id":
                    hint = ("the line's custom_id is its request id" if key == "request_id"
                            else f"a field of the host's own: put it in the line's {EXTENSION!r} object")
                    return reject(f"body.{key}", f"not a chat-completions parameter ({hint})")
                return reject(f"body.{key}", "unknown chat-completions parameter")
        stream = body.get("stream")
        if stream is True:
            return reject("body.stream", "a batch does not stream (OpenAI's Batch API refuses it too): remove it or "
                          "set it to false")
        if stream not in (None, False):
            return reject("body.stream", f"must be false or absent in a batch, got {_show(stream)}")
        if body.get("stream_options") is not None:
            return reject("body.stream_options", "only goes with stream, which a batch does not use")
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        request.update(ksi)
        request["request_id"] = own
        try:
            return build(request, lineno, lambda field: self.field(field))
        except ValidationError as e:
            return Rejected(known[0], e, known[1], known[2])

    def field(self, name: str) -> str:
        top = root(name)
        if top == "request_id":
            return "custom_id"
        if top in KSI_FIELDS:
            return f"{EXTENSION}.{name}"
        return "line" if top == "request" else f"body.{name}"

    # -- output ---------------------------------------------------------------------------

    def render(self, result: CompletionResult, rejected: Rejected | None = None) -> dict[str, Any]:
        rid = result.request_id
        cause = rejected.error if rejected is not None else None
        # a line's own id: unique in the file, also for a line that repeats an earlier line's custom_id
        where = f"{rid}\0line {cause.line}" if isinstance(cause, ValidationError) and cause.line else rid
        line: dict[str, Any] = {"id": f"batch_req_{_hash(where)}",
                                "custom_id": rid if rejected is None or rejected.own_id else None,
                                "response": None, "error": None}
        if result.ok:
            line["response"] = {"status_code": 200, "request_id": rid, "body": chat_completion(result)}
            return line
        info = result.error or {"type": "OperationalError", "message": f"the request ended {result.status}"}
        kind = "Cancelled" if result.status == "cancelled" else info.get("type", "")
        status, openai_type, code = ERRORS.get((rejected.cause if rejected else None) or kind, OTHER_ERROR)
        param = cause.field if isinstance(cause, ValidationError) else None
        error: dict[str, Any] = {"code": code, "message": info.get("message", "")}
        if isinstance(cause, ValidationError):
            error.update(line=cause.line, param=param)
        if status is not None:
            body_error = {"message": error["message"], "type": openai_type, "param": param, "code": code}
            line["response"] = {"status_code": status, "request_id": rid, "body": {"error": body_error}}
        line["error"] = error
        return line


def chat_completion(result: CompletionResult) -> dict[str, Any]:
    """An ``ok`` result as OpenAI's ``chat.completion`` object (the body of a Batch output line).

    ``id`` is derived from the request id and ``created`` is when the request finished, so a rerun
    answered from the store writes the same object. A result without a stored message (a store that
    keeps only the text) gets an assistant message of its text; without a finish reason, ``stop``
    (as the host's own streaming does for an answer that states none)."""
    message = dict(result.message) if result.message else {"role": "assistant", "content": result.text or ""}
    message.setdefault("refusal", None)
    u = result.usage
    usage: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                             "total_tokens": u.total_tokens}
    if u.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    if u.reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
    when = result.finished_at or result.started_at or 0
    return {
        "id": f"chatcmpl-{_hash(result.request_id)}",
        "object": "chat.completion",
        "created": int(when),
        "model": result.model,
        "choices": [{"index": 0, "message": message, "logprobs": result.logprobs, "finish_reason": result.finish_reason or "stop"}],
        "usage": usage,
        "system_fingerprint": result.system_fingerprint,
    }


def _show(value: Any) -> str:
    """A value for an error message: short, and printable whatever it holds."""
    text = repr(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 60 else text[:57] + "..."
