"""The data that crosses hooks: requests, results, usage, attempts, decisions.

Every class is an attrs class. Validation happens at the edge: building a
:class:`CompletionRequest` (directly or with :meth:`CompletionRequest.from_dict`)
raises :class:`~ksi_host.errors.ValidationError` naming the field and why.
"""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import attrs

from .chat import PARAMETERS, check_document, check_messages, check_parameters, check_text, needs
from .errors import ValidationError, did_you_mean

PRIORITIES: dict[str, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3, "background": 4}
"""Priority names and their rank (lower runs first)."""

DEFAULT_PROVIDER_PRIORITY = 100
"""The rank of a provider (deployment) that states none: see :attr:`ProviderInfo.priority`."""

STATUSES = frozenset({"ok", "error", "cancelled"})
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")

MAX_TIMEOUT_S = 30 * 86400
"""The longest deadline a request may set (``timeout_s``): 30 days."""


def _fail(field: str, reason: str) -> None:
    raise ValidationError(field, reason)


def _required_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        _fail(name, "is required and must be a non-empty string")
    check_text(name, value)


def _optional_text(name: str, value: Any) -> None:
    if value is not None:
        if not isinstance(value, str) or not value:
            _fail(name, "must be a non-empty string or null")
        check_text(name, value)


def _metadata(value: Any) -> None:
    if not isinstance(value, dict):
        _fail("metadata", "must be an object")
    for k, v in value.items():
        if not isinstance(k, str):
            _fail("metadata", f"keys must be strings, got {k!r}")
        if v is not None and not isinstance(v, (str, int, float, bool)):
            _fail(f"metadata.{k}", "values must be strings, numbers, booleans or null")
    check_document("metadata", value)


def _validate_request(r: CompletionRequest) -> None:
    """Every check of a request, in field order (attrs runs it after ``__init__``): raises
    ValidationError naming the field and why."""
    _required_text("model", r.model)
    check_messages(r.messages)
    _required_text("request_id", r.request_id)
    for name in ("session_id", "agent_id", "originator_agent_id", "purpose"):
        _optional_text(name, getattr(r, name))
    if not isinstance(r.priority, str) or r.priority not in PRIORITIES:
        _fail("priority", f"must be one of {', '.join(PRIORITIES)}; got {r.priority!r}")
    t = r.timeout_s
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= MAX_TIMEOUT_S):
        _fail("timeout_s", f"must be a positive number of seconds, at most {MAX_TIMEOUT_S} (30 days), or null; got {t!r}")
    _metadata(r.metadata)
    check_parameters(r.parameters())
    if r.provider_options is not None:
        check_document("provider_options", r.provider_options)
        if not isinstance(r.provider_options, dict):
            _fail("provider_options", "must be an object (passed to the provider as it is)")
    if not isinstance(r.continue_session, bool):
        _fail("continue_session", f"must be true or false, got {r.continue_session!r}")
    if r.continue_session and r.session_id is None:
        _fail("continue_session", "needs a session_id (the session whose conversation continues)")
    h = r.history
    if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < len(r.messages):
        _fail("history", f"must be a count of earlier messages, 0 to {len(r.messages) - 1} (fewer than the "
                         f"{len(r.messages)} messages), got {h!r}")


def new_request_id() -> str:
    """A new request id: 32 hex digits of a version-7 UUID (RFC 9562).

    Random like a uuid4 (74 random bits), but its first 48 bits are the time in
    milliseconds, so ids made later sort later. SQLite indexes keyed by request
    id (the queue's, the ledger's) then grow at their end instead of touching a
    random page per insert, which roughly halves the cost of each durable write.
    The random bits come from a generator seeded from ``os.urandom`` (and seeded
    again in a forked child): ids must be unique, not secret, and a system call
    per id cost more than the rest of this function.
    """
    rand = _id_bits(74)
    value = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & _LOW62
    return f"{value:032x}"


_id_random = random.Random()  # seeded from os.urandom
_id_bits = _id_random.getrandbits
os.register_at_fork(after_in_child=_id_random.seed)  # a child must not repeat its parent's ids
_LOW62 = (1 << 62) - 1


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen(slots=True)
class CompletionRequest:
    """One completion to run. Only ``model`` and ``messages`` are required.

    The host's own fields come first (``request_id``, ``session_id``,
    ``agent_id``, ``originator_agent_id``, ``purpose``, ``priority``,
    ``timeout_s``: a deadline over all attempts, ``metadata``); the
    chat-completions parameters of the OpenAI schema follow
    (:data:`ksi_host.chat.PARAMETERS`; providers send the ones set, under the
    same names), then ``provider_options`` (passed to the provider as it is,
    for what the schema does not name) and ``continue_session`` (send the
    session's earlier turns first: needs a session plugin).

    ``history`` is not a user's field (``from_dict`` refuses it): how many of
    ``messages`` are earlier turns of the session that a session plugin put
    before the request's own in ``ksi_prepare_request``. A provider that keeps
    the conversation itself sends only ``messages[history:]`` when it resumes
    its own conversation, and everything when it has none to resume.
    """

    model: str
    messages: tuple[dict[str, Any], ...] = attrs.field(converter=_tuple)
    request_id: str = attrs.field(factory=lambda: new_request_id())
    session_id: str | None = None
    agent_id: str | None = None
    originator_agent_id: str | None = None
    purpose: str | None = None
    priority: str = "normal"
    max_tokens: int | None = None
    temperature: float | None = None
    timeout_s: float | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)
    max_completion_tokens: int | None = None
    top_p: float | None = None
    stop: str | tuple[str, ...] | None = attrs.field(default=None, converter=_tuple)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int | None = None
    user: str | None = None
    tools: tuple[dict[str, Any], ...] | None = attrs.field(default=None, converter=_tuple)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    modalities: tuple[str, ...] | None = attrs.field(default=None, converter=_tuple)
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    provider_options: dict[str, Any] | None = None
    continue_session: bool = False
    history: int = 0

    def __attrs_post_init__(self) -> None:
        _validate_request(self)

    def parameters(self) -> dict[str, Any]:
        """The chat-completions parameters this request sets (name -> value, None left out), in the
        order of :data:`ksi_host.chat.PARAMETERS`; tuples as lists (what a JSON body holds)."""
        found = {}
        for name in PARAMETERS:
            value = getattr(self, name)
            if value is not None:
                found[name] = list(value) if isinstance(value, tuple) else value
        return found

    def needs(self) -> frozenset[str]:
        """What this request asks of a provider (see :func:`ksi_host.chat.needs`)."""
        return needs(self.parameters(), self.messages)

    @classmethod
    def from_dict(cls, data: Any) -> CompletionRequest:
        """Build a request from JSON-like data.

        Accepts ``prompt`` (a string) as shorthand for one user message.
        Unknown keys, missing or wrong fields raise ValidationError naming the field.
        """
        if not isinstance(data, dict):
            raise ValidationError("request", f"must be a JSON object, got {type(data).__name__}")
        if not _REQUEST_KEYS.issuperset(data):
            unknown = sorted(str(k) for k in data if k not in _REQUEST_KEYS)  # (a key may be any hashable)
            raise ValidationError(unknown[0], f"unknown field{did_you_mean(unknown[0], _REQUEST_KEYS)} "
                                              f"(known: {', '.join(sorted(_REQUEST_KEYS))})")
        data = {k: v for k, v in data.items() if v is not None or k not in _DEFAULTED}  # null: the default
        if "prompt" in data:
            prompt = data.pop("prompt")
            if "messages" in data:
                raise ValidationError("prompt", "give either 'prompt' or 'messages', not both")
            if not isinstance(prompt, str) or not prompt:
                raise ValidationError("prompt", "must be a non-empty string")
            check_text("prompt", prompt)
            data["messages"] = [{"role": "user", "content": prompt}]
        for name in ("model", "messages"):
            if data.get(name) is None:
                raise ValidationError(name, "is required" + (" (or give 'prompt')" if name == "messages" else ""))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON data: every field that is set (None and defaults of the chat parameters
        left out), tuples as lists."""
        d: dict[str, Any] = {}
        for a in attrs.fields(CompletionRequest):
            value = getattr(self, a.name)
            if value is None or (a.name in ("continue_session", "history") and not value):
                continue
            d[a.name] = list(value) if isinstance(value, tuple) else value
        return d


_REQUEST_FIELDS = frozenset(a.name for a in attrs.fields(CompletionRequest)) - {"history"}  # history: set by plugins only
_REQUEST_KEYS = _REQUEST_FIELDS | {"prompt"}
_DEFAULTED = frozenset({"request_id", "metadata", "priority", "continue_session", "prompt"})  # null means "the default"


def _add(a: Any, b: Any) -> Any:
    """The sum of two optional amounts: None only when both are unknown."""
    return None if a is None and b is None else (a or 0) + (b or 0)


@attrs.frozen(slots=True)
class Usage:
    """Token usage one upstream call reported (or a sum of calls).

    ``cost_usd`` is None when unknown; ``cached_tokens`` (prompt tokens served
    from the provider's cache) and ``reasoning_tokens`` (completion tokens
    spent on reasoning) are None when the provider does not report them.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            _add(self.cost_usd, other.cost_usd),
            _add(self.cached_tokens, other.cached_tokens),
            _add(self.reasoning_tokens, other.reasoning_tokens),
        )

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(slots=True)
class ProviderResponse:
    """What :meth:`Provider.complete` returns on success.

    ``text`` is the answer's content ("" when it has none, as a tool-call
    answer may); ``tool_calls`` the OpenAI-shaped tool calls
    (``{"id", "type": "function", "function": {"name", "arguments"}}``) or
    None; ``finish_reason`` one of ``stop``, ``length``, ``tool_calls``,
    ``content_filter`` (None when the upstream said none); ``logprobs`` the
    choice's log probabilities as the OpenAI schema shapes them
    (``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...],
    "refusal": ...}``, a document passed on as it is), None when the upstream
    sent none (the request did not ask for them); ``system_fingerprint`` the
    upstream's ``system_fingerprint`` (which backend configuration answered:
    with ``seed``, a caller's way to see that the backend changed), None when
    it sent none.
    """

    text: str
    usage: Usage | None = None
    model: str | None = None  # the upstream's own model name, if it said
    session_id: str | None = None  # the session the conversation continues under, if the provider has one
    tool_calls: tuple[dict[str, Any], ...] | None = attrs.field(default=None, converter=_tuple)
    finish_reason: str | None = None
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    system_fingerprint: str | None = None

    def message(self) -> dict[str, Any]:
        """The assistant message of this answer, as the OpenAI schema shapes it (``content`` null when the answer is
        only tool calls or a refusal, as OpenAI's is)."""
        bare = not self.text and (self.tool_calls or self.refusal is not None)
        message: dict[str, Any] = {"role": "assistant", "content": None if bare else self.text}
        if self.tool_calls:
            message["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.refusal is not None:
            message["refusal"] = self.refusal
        return message


@attrs.frozen(slots=True)
class ProviderInfo:
    """One provider (deployment) as ``ksi_list_providers`` describes it.

    ``state`` is the circuit state: ``closed`` (healthy), ``open`` (skipped
    until its cool-down ends) or ``half_open`` (one trial call allowed).
    ``priority`` ranks provider plugins that serve the same model: the host
    asks the plugin whose deployments rank lowest first (ties: by plugin
    name), and the next one when it has nothing usable. ``supports`` names
    what the deployment can send (chat parameters such as ``tools``, content
    part types such as ``image_url``: see :meth:`CompletionRequest.needs`);
    None means the whole chat-completions surface. The host does not send a
    request to a deployment that lacks something it needs.
    """

    name: str
    model: str  # the model name or glob pattern it serves
    plugin: str
    state: str = "closed"
    detail: dict[str, Any] = attrs.field(factory=dict)
    priority: int = DEFAULT_PROVIDER_PRIORITY
    supports: frozenset[str] | None = None

    @property
    def available(self) -> bool:
        return self.state != "open"


@runtime_checkable
class Provider(Protocol):
    """What ``ksi_select_provider`` returns: one deployment, ready to call.

    ``name`` is unique across the host and appears in results and the ledger.
    ``timeout_s`` is the per-attempt timeout the deployment is configured with.
    ``complete`` makes exactly one upstream attempt; it returns a
    :class:`ProviderResponse` or raises an :class:`~ksi_host.errors.OperationalError`
    (usually a :class:`~ksi_host.errors.ProviderError` subclass, with ``usage``
    set when the upstream reported usage for the failed call).

    An optional ``async prepare()`` is awaited before each attempt's clock starts: work
    that is not the upstream's time (a lazy import, a client to open), counted neither
    in the attempt's timeout nor in its ``latency_ms``. Once done, it should return at
    once (:class:`~ksi_host.providers.DeploymentProvider` has one that does nothing).
    """

    name: str
    timeout_s: float | None

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse: ...


@attrs.frozen(slots=True)
class ChatDelta:
    """One piece of a streamed answer: what ``Provider.stream`` yields and ``host.stream`` hands out.

    ``content`` is the next piece of text; ``tool_calls`` pieces of tool calls
    in the OpenAI delta shape (``{"index", "id", "type", "function": {"name",
    "arguments"}}``, each key present only when it has something: a call's
    ``arguments`` arrive in pieces under the same ``index``); ``finish_reason``
    comes with the last piece, ``usage`` with it or after it (when the
    upstream reports usage for a stream); ``logprobs`` the log probabilities
    of the piece's tokens as the chunk's ``choices[0].logprobs`` shapes them
    (``{"content": [...], "refusal": [...]}``), None when it has none;
    ``system_fingerprint`` the chunk's (the stream's result keeps the last
    one sent), None when it has none.

    A provider that can stream has, besides ``complete``, ``stream(request,
    *, timeout_s)``: an async iterator of ChatDelta making exactly one upstream
    call; ``timeout_s`` bounds the wait for the first piece and between pieces.
    It raises OperationalErrors like ``complete``, and ends only after the
    upstream said it finished (a ``finish_reason``): a stream cut short is a
    failure, never a clean end. Closing the iterator early (``aclose``) closes
    the upstream call. A provider without ``stream`` serves a streamed request
    with ``complete``, as one delta.
    """

    content: str | None = None
    tool_calls: tuple[dict[str, Any], ...] | None = attrs.field(default=None, converter=_tuple)
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    refusal: str | None = None
    logprobs: dict[str, Any] | None = None
    system_fingerprint: str | None = None


@attrs.frozen(slots=True)
class Attempt:
    """One attempt of a request, as the final result reports it and ``ksi_attempt_finished`` receives it.

    ``provider`` is None when no provider was chosen (none served the model, or
    every one was behind an open circuit). ``latency_ms`` runs from the call
    to its end (``ttft_ms``: to the first streamed delta, None when not
    streamed). The usage of the attempt's upstream call is in the ledger (and
    in the ``call`` that ``ksi_attempt_finished`` receives).
    """

    number: int
    provider: str | None
    error_type: str | None = None  # None when this attempt succeeded
    error_message: str | None = None
    delay_s: float | None = None  # the wait before the next attempt; None for the last
    latency_ms: float | None = None
    ttft_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(slots=True)
class AttemptContext:
    """What ``ksi_handle_failure`` knows about the attempt that just failed.

    ``number`` counts from 1. ``started_at`` and ``now`` are readings of
    ``host.clock`` (monotonic seconds): when the request's first attempt
    began, and now. ``deadline`` is ``started_at + request.timeout_s`` or None.
    ``history`` holds the earlier attempts; ``excluded`` the providers already
    switched away from (this one not included).
    """

    number: int
    provider: str | None
    started_at: float
    now: float
    deadline: float | None
    history: tuple[Attempt, ...] = ()
    excluded: frozenset[str] = frozenset()

    @property
    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.now


@attrs.frozen(slots=True)
class FailureDecision:
    """What a failed attempt becomes (the answer of ``ksi_handle_failure``).

    Use the constructors: ``FailureDecision.retry(delay_s, switch_provider=...)``
    or ``FailureDecision.give_up(error)``.
    """

    action: str = attrs.field(validator=attrs.validators.in_({"retry", "give_up"}))
    delay_s: float = 0.0
    switch_provider: bool = False  # exclude the failed provider from the next selection
    error: Exception | None = None  # for give_up: the error to report (may wrap the original)

    @classmethod
    def retry(cls, delay_s: float = 0.0, *, switch_provider: bool = False) -> FailureDecision:
        return cls("retry", max(0.0, float(delay_s)), switch_provider)

    @classmethod
    def give_up(cls, error: Exception) -> FailureDecision:
        return cls("give_up", 0.0, False, error)


OUTCOME_SENT = "sent"
OUTCOME_OK = "ok"
OUTCOME_UNKNOWN = "unknown"


@attrs.frozen(slots=True)
class UpstreamCall:
    """One call to a provider: what ``ksi_attempt_started`` and ``ksi_record_usage`` receive.

    ``outcome`` is ``sent`` when the call is about to go out
    (``ksi_attempt_started``); then ``ok``, the error type of a failed call
    (``RateLimited``, ...), or ``unknown`` when the host stopped waiting after
    sending it (a timeout, a cancel): the upstream may have answered and billed
    it. ``usage`` is what the upstream reported (None: nothing). ``call_id``
    is the same in both hooks, and unique.
    """

    request_id: str
    attempt: int
    provider: str
    model: str
    usage: Usage | None = None
    latency_ms: float | None = None
    outcome: str = OUTCOME_SENT
    created_at: float = attrs.field(factory=time.time)  # unix seconds, when the call was sent
    call_id: str = attrs.field(factory=lambda: new_request_id())
    ttft_ms: float | None = None


def iso(ts: float | None) -> str | None:
    """Unix seconds to an ISO 8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@attrs.frozen(slots=True)
class CompletionResult:
    """The final outcome of one request.

    ``status`` is ``ok``, ``error`` or ``cancelled``. ``text`` is the answer's
    content; ``message`` the whole assistant message (``role``, ``content``,
    ``tool_calls`` as the OpenAI schema shapes them) and ``finish_reason``
    (``stop``, ``length``, ``tool_calls``, ``content_filter``) when ok.
    ``model`` is what answered. ``usage`` sums every upstream call of the
    request (retries included). ``error`` is None when ok, else
    ``{"type": ..., "message": ...}``. Times are unix seconds: ``submitted_at``
    when the queue accepted it (None when unknown), ``started_at`` when it
    began to run, ``finished_at`` when it ended. ``logprobs`` is the answer's
    log probabilities (see :class:`ProviderResponse`) when the request asked
    for them (``logprobs: true``) and the upstream sent them, else None;
    ``system_fingerprint`` the upstream's (see :class:`ProviderResponse`),
    None when it sent none.
    """

    request_id: str
    status: str = attrs.field(validator=attrs.validators.in_(STATUSES))
    text: str | None = None
    model: str | None = None
    provider: str | None = None
    session_id: str | None = None
    usage: Usage = attrs.field(factory=Usage)
    attempts: tuple[Attempt, ...] = ()
    error: dict[str, str] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    message: dict[str, Any] | None = None
    finish_reason: str | None = None
    submitted_at: float | None = None
    logprobs: dict[str, Any] | None = None
    system_fingerprint: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(
        cls,
        request_id: str,
        error: Exception,
        *,
        model: str | None = None,
        session_id: str | None = None,
        status: str | None = None,
        **kw: Any,
    ) -> CompletionResult:
        """An error (or cancelled) result for ``error``."""
        from .errors import Cancelled, OperationalError

        info = error.to_dict() if isinstance(error, OperationalError) else {"type": type(error).__name__, "message": str(error)}
        status = status or ("cancelled" if isinstance(error, Cancelled) else "error")
        now = time.time()
        kw.setdefault("started_at", now)
        kw.setdefault("finished_at", now)
        return cls(request_id, status, model=model, session_id=session_id, error=info, **kw)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to results files (``logprobs`` and ``system_fingerprint`` only when set)."""
        d = {
            "request_id": self.request_id,
            "status": self.status,
            "text": self.text,
            "model": self.model,
            "provider": self.provider,
            "session_id": self.session_id,
            "usage": self.usage.to_dict(),
            "attempts": [a.to_dict() for a in self.attempts],
            "error": self.error,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "message": self.message,
            "finish_reason": self.finish_reason,
            "submitted_at": iso(self.submitted_at),
        }
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.system_fingerprint is not None:
            d["system_fingerprint"] = self.system_fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompletionResult:
        """Inverse of :meth:`to_dict` (times may be ISO strings or unix seconds)."""

        def ts(v: Any) -> float | None:
            if v is None or isinstance(v, (int, float)):
                return v
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()

        return cls(
            d["request_id"],
            d["status"],
            text=d.get("text"),
            model=d.get("model"),
            provider=d.get("provider"),
            session_id=d.get("session_id"),
            usage=Usage(**(d.get("usage") or {})),
            attempts=tuple(Attempt(**a) for a in d.get("attempts") or ()),
            error=d.get("error"),
            started_at=ts(d.get("started_at")),
            finished_at=ts(d.get("finished_at")),
            message=d.get("message"),
            finish_reason=d.get("finish_reason"),
            submitted_at=ts(d.get("submitted_at")),
            logprobs=d.get("logprobs"),
            system_fingerprint=d.get("system_fingerprint"),
        )


@attrs.frozen
class RequestQuery:
    """Which requests ``ksi_list_requests`` lists (``ksi-host logs``): newest first, at most ``limit``."""

    limit: int = attrs.field(default=20, validator=attrs.validators.and_(attrs.validators.instance_of(int),
                                                                        attrs.validators.ge(1)))
    session_id: str | None = None
    agent_id: str | None = None
    model: str | None = None
    status: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_(("queued", "running", *sorted(STATUSES)))))
    since: float | None = None  # unix seconds


class Ticket:
    """A handle on a submitted request: ``await ticket.result()``.

    The queue plugin creates it in ``ksi_enqueue`` (``Ticket(request_id)``)
    and completes it with :meth:`set_result` or, for a programming error,
    :meth:`set_exception`. Several tickets may share one request (a request
    submitted again while it is queued).
    """

    __slots__ = ("request_id", "_future")

    def __init__(self, request_id: str, future: Any = None) -> None:
        import asyncio

        self.request_id = request_id
        self._future = future if future is not None else asyncio.get_running_loop().create_future()

    @classmethod
    def done(cls, result: CompletionResult) -> Ticket:
        t = cls(result.request_id)
        t._future.set_result(result)
        return t

    @property
    def future(self) -> Any:
        return self._future

    def is_done(self) -> bool:
        return self._future.done()

    def set_result(self, result: CompletionResult) -> None:
        if not self._future.done():
            self._future.set_result(result)

    def set_exception(self, exc: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(exc)

    async def result(self) -> CompletionResult:
        import asyncio

        return await asyncio.shield(self._future)

    def __repr__(self) -> str:
        return f"<Ticket {self.request_id} {'done' if self.is_done() else 'pending'}>"
