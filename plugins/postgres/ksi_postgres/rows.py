"""Requests and results to rows and back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from ksi_host.errors import ValidationError
from ksi_host.models import PRIORITIES, Attempt, CompletionRequest, CompletionResult, Usage

from .schema import PARAMETER_TYPES

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_canonical = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode

ASKED = ("model", "messages", *PARAMETER_TYPES, "provider_options")
"""What a request asks: a request id submitted again with any of these different is refused. Who asks and
how it is scheduled (session, agent, purpose, priority, timeout, metadata) may differ."""


def _json(value: Any, field: str) -> str:
    try:
        return _encode(value)
    except (TypeError, ValueError) as e:
        raise ValidationError(field, f"must be JSON-serialisable to be queued ({e})") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def request_hash(r: CompletionRequest) -> str:
    """A hash (BLAKE2b, 128 bits) of what ``r`` asks (:data:`ASKED`), keys sorted."""
    asked = {name: _plain(getattr(r, name)) for name in ASKED}
    try:
        text = _canonical(asked)
    except (TypeError, ValueError) as e:
        raise ValidationError("request", f"must be JSON-serialisable to be queued ({e})") from None
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def differences(stored: CompletionRequest, new: CompletionRequest) -> list[str]:
    """The fields of :data:`ASKED` whose values differ (by value: key order, 1 or 1.0 do not count)."""
    return [name for name in ASKED if getattr(stored, name) != getattr(new, name)]


def accept_row(r: CompletionRequest) -> tuple[tuple[Any, ...], list[Any]]:
    """The ksi_pg_requests values (schema.ACCEPT_TYPES order) and the payload values (PAYLOAD_COLUMNS order)."""
    row = (r.request_id, r.session_id, r.agent_id, r.originator_agent_id, r.purpose, r.model, r.priority,
           PRIORITIES[r.priority], r.timeout_s, request_hash(r))
    payload: list[Any] = [_json(list(r.messages), "messages"), _json(r.metadata, "metadata"),
                          None if r.provider_options is None else _json(r.provider_options, "provider_options"),
                          r.continue_session]
    for name, sqltype in PARAMETER_TYPES.items():
        value = getattr(r, name)
        payload.append(None if value is None else _json(_plain(value), name) if sqltype == "json" else value)
    return row, payload


def request_from_row(row: Any) -> CompletionRequest:
    """A request from the columns of schema.REQUEST_COLUMNS."""
    params: dict[str, Any] = {}
    for name, sqltype in PARAMETER_TYPES.items():
        value = row[name]
        if value is not None:
            params[name] = json.loads(value) if sqltype == "json" else value
    return CompletionRequest(
        model=row["model"], messages=json.loads(row["messages"]), request_id=row["request_id"],
        session_id=row["session_id"], agent_id=row["agent_id"], originator_agent_id=row["originator_agent_id"],
        purpose=row["purpose"], priority=row["priority"], timeout_s=row["timeout_s"],
        metadata=json.loads(row["metadata"]),
        provider_options=None if row["provider_options"] is None else json.loads(row["provider_options"]),
        continue_session=row["continue_session"], **params,
    )


def store_row(seq: int, epoch: int, r: CompletionResult) -> tuple[Any, ...]:
    """schema.STORE_TYPES values of a final result."""
    u = r.usage
    err = r.error or {}
    return (seq, epoch, r.status, r.started_at, r.finished_at, r.text,
            None if r.message is None else _encode(r.message), r.finish_reason, r.model, r.provider, r.session_id,
            u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost_usd, u.cached_tokens, u.reasoning_tokens,
            err.get("type"), err.get("message"), None if r.logprobs is None else _encode(r.logprobs), r.system_fingerprint)


def attempt_rows(seq: int, r: CompletionResult) -> list[tuple[Any, ...]]:
    return [(seq, a.number, a.provider, a.error_type, a.error_message, a.delay_s, a.latency_ms, a.ttft_ms)
            for a in r.attempts]


def attempt_from_row(row: Any) -> Attempt:
    return Attempt(row["number"], row["provider"], row["error_type"], row["error_message"], row["delay_s"],
                   row["latency_ms"], row["ttft_ms"])


def result_from_row(row: Any, attempts: Sequence[Attempt] = ()) -> CompletionResult:
    """A final result from the columns of schema.RESULT_COLUMNS."""
    error = None if row["error_type"] is None else {"type": row["error_type"], "message": row["error_message"]}
    return CompletionResult(
        row["request_id"], row["status"], text=row["result_text"], model=row["result_model"],
        provider=row["result_provider"], session_id=row["result_session_id"],
        usage=Usage(row["prompt_tokens"] or 0, row["completion_tokens"] or 0, row["total_tokens"] or 0, row["cost_usd"],
                    row["cached_tokens"], row["reasoning_tokens"]),
        attempts=tuple(attempts), error=error, started_at=row["started_at"], finished_at=row["finished_at"],
        message=None if row["result_message"] is None else json.loads(row["result_message"]),
        finish_reason=row["finish_reason"], submitted_at=row["created_at"],
        logprobs=None if row["result_logprobs"] is None else json.loads(row["result_logprobs"]),
        system_fingerprint=row["system_fingerprint"],
    )
