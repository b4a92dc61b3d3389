"""Streaming: answers handed out piece by piece as they arrive.

``host.stream(request)`` returns a :class:`CompletionStream`: iterate it for
:class:`~ksi_host.models.ChatDelta` pieces; ``stream.result`` is the stored
final result once the iteration ends. The request goes through the queue like
any other (its session's turn, its priority); the host registers a
:class:`StreamSink` under its request id, and :meth:`ksi_host.Host.execute`,
finding it, makes each attempt with :func:`stream_once` instead of
``Provider.complete``.

The rules:

* Retries and failover happen only before the first piece is handed out; a
  failure after that ends the request (status ``error``, its text what was
  handed out) and the iterator raises the error: never a clean end.
* A stream that ends without the upstream saying it finished (no
  ``finish_reason``) is a failure (ProviderUnavailable), not an answer.
* A consumer that stops iterating (``break``, ``aclose``) cancels the request:
  the upstream call is closed and the request is stored ``cancelled`` with
  what was received.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import Cancelled, OperationalError, ProviderUnavailable, ValidationError
from .models import ChatDelta, CompletionRequest, CompletionResult, Provider, ProviderResponse, Usage

if TYPE_CHECKING:
    from .service import Host


class Assembly:
    """The answer so far, from its pieces: text, tool calls (merged by ``index``), finish reason, usage, the
    log probabilities of the pieces that had them (their ``content`` and ``refusal`` entries, in order), and the
    last system fingerprint a piece had."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None
        self.refusal: str | None = None
        self.logprobs: dict[str, list[Any] | None] | None = None
        self.system_fingerprint: str | None = None

    def add(self, delta: ChatDelta) -> None:
        if delta.content:
            self.text.append(delta.content)
        for piece in delta.tool_calls or ():
            call = self.calls.setdefault(piece.get("index", 0), {"id": None, "type": "function",
                                                                   "function": {"name": "", "arguments": ""}})
            if piece.get("id"):
                call["id"] = piece["id"]
            fn = piece.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.model is not None:
            self.model = delta.model
        if delta.refusal is not None:
            self.refusal = (self.refusal or "") + delta.refusal
        if delta.logprobs is not None:
            self._add_logprobs(delta.logprobs)
        if delta.system_fingerprint is not None:
            self.system_fingerprint = delta.system_fingerprint

    def _add_logprobs(self, piece: dict[str, Any]) -> None:
        found = self.logprobs
        if found is None:
            found = self.logprobs = {"content": None, "refusal": None}
        for key in ("content", "refusal"):
            entries = piece.get(key)
            if entries:
                so_far = found[key]
                if so_far is None:
                    found[key] = list(entries)
                else:
                    so_far.extend(entries)

    def response(self, session_id: str | None = None) -> ProviderResponse:
        calls = tuple(self.calls[i] for i in sorted(self.calls)) or None
        return ProviderResponse("".join(self.text), usage=self.usage, model=self.model, session_id=session_id,
                                tool_calls=calls, finish_reason=self.finish_reason, refusal=self.refusal,
                                logprobs=self.logprobs, system_fingerprint=self.system_fingerprint)


def deltas_of(response: ProviderResponse) -> ChatDelta:
    """A whole answer as one piece (a provider without ``stream``, or a result answered from the store)."""
    calls = tuple({"index": i, **call} for i, call in enumerate(response.tool_calls or ())) or None
    return ChatDelta(response.text or None, calls, response.finish_reason or "stop", response.usage, response.model,
                     response.refusal, response.logprobs, response.system_fingerprint)


class StreamSink:
    """Where the attempts of one streamed request put their pieces for the consumer.

    The consumer waits on one future that :meth:`put` (or the end of the request) completes: measured on
    ``benchmarks/ttft.py``, handing the first piece over took 0.17 ms this way against 0.27 ms with an
    ``asyncio.Queue`` read by a task raced against the request's end in ``asyncio.wait``."""

    def __init__(self) -> None:
        self.pieces: deque[ChatDelta] = deque()
        self.handed_out = 0  # pieces put for the consumer, over all attempts
        self.gone = False  # the consumer stopped reading
        self.on_gone: Callable[[], Any] | None = None  # set while an attempt streams: stops it
        self._waiter: asyncio.Future[None] | None = None

    def put(self, delta: ChatDelta) -> None:
        self.handed_out += 1
        if not self.gone:  # nobody reads a sink whose consumer left (the request goes on without it)
            self.pieces.append(delta)
            self.wake()

    def wake(self, *_: Any) -> None:
        """Let the consumer look again (a piece came, or the request ended)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until :meth:`wake` is called."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class ConsumerGone(Cancelled):
    """The consumer stopped reading the stream: the request ends ``cancelled`` with what was received."""


async def stream_once(provider: Provider, request: CompletionRequest, timeout_s: float | None, sink: StreamSink,
                      clock: Callable[[], float]) -> tuple[ProviderResponse, float | None, Assembly]:
    """One streamed attempt: ``provider.stream`` (or ``complete`` as one piece), each piece handed to
    ``sink`` as it arrives. Returns the answer, the time to its first piece (ms) and the assembly (what
    was handed out, also when this raises). Raises the attempt's OperationalError, ConsumerGone, or
    ProviderUnavailable for a stream that ended without a finish reason."""
    assembly = Assembly()
    first: list[float] = []
    started = clock()
    if getattr(provider, "stream", None) is None:
        response = await call_complete(provider, request, timeout_s)
        first.append((clock() - started) * 1000)
        delta = deltas_of(response)
        assembly.add(delta)
        sink.put(delta)
        return response, first[0], assembly
    pump = asyncio.ensure_future(_pump(provider, request, timeout_s, sink, assembly, lambda: first.append(
        (clock() - started) * 1000)))
    sink.on_gone = pump.cancel
    try:
        await pump
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if sink.gone and pump.cancelled() and task is not None and not task.cancelling():
            error = ConsumerGone(f"the consumer stopped reading after {sink.handed_out} piece(s)")
            error.assembly = assembly  # type: ignore[attr-defined]
            raise error from None
        raise
    except OperationalError as e:
        e.assembly = assembly  # type: ignore[attr-defined]
        raise
    finally:
        sink.on_gone = None
    return assembly.response(request.session_id), (first[0] if first else None), assembly


async def _pump(provider: Any, request: CompletionRequest, timeout_s: float | None, sink: StreamSink,
                assembly: Assembly, on_first: Callable[[], None]) -> None:
    pieces: AsyncIterator[ChatDelta] = provider.stream(request, timeout_s=timeout_s)
    first = True
    try:
        async for delta in pieces:
            if first:
                on_first()
                first = False
            assembly.add(delta)
            sink.put(delta)
    except OperationalError:
        raise
    except Exception as e:
        e.add_note(f"raised by provider {provider.name!r} ({type(provider).__module__}) in Provider.stream")
        raise
    finally:
        close = getattr(pieces, "aclose", None)
        if close is not None:
            await close()  # closes the upstream call when the stream stops early
    if assembly.finish_reason is None:
        raise ProviderUnavailable(f"{provider.name}: the stream ended before the upstream said it finished "
                                  "(no finish_reason): the answer was cut off", provider=provider.name,
                                  usage=assembly.usage)


async def call_prepare(provider: Provider) -> None:
    """``provider.prepare()`` where it has one (see :class:`~ksi_host.models.Provider`); a programming error it
    raises gets a note naming the provider."""
    prepare = getattr(provider, "prepare", None)
    if prepare is None:
        return
    try:
        await prepare()
    except OperationalError:
        raise
    except Exception as e:
        e.add_note(f"raised by provider {provider.name!r} ({type(provider).__module__}) in Provider.prepare")
        raise


async def call_complete(provider: Provider, request: CompletionRequest, timeout_s: float | None) -> ProviderResponse:
    """``provider.complete``; a programming error it raises gets a note naming the provider."""
    try:
        response = await provider.complete(request, timeout_s=timeout_s)
        if not isinstance(response, ProviderResponse):
            raise TypeError(f"Provider.complete returned {type(response).__name__}, not a ProviderResponse")
        return response
    except OperationalError:
        raise
    except Exception as e:
        e.add_note(f"raised by provider {provider.name!r} ({type(provider).__module__}) in Provider.complete")
        raise


def error_of(result: CompletionResult) -> OperationalError:
    """The OperationalError a failed result names (its class when ksi_host defines it)."""
    info = result.error or {"type": "OperationalError", "message": "the request failed"}
    cls = getattr(errors, info["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, OperationalError)) or cls is errors.ValidationError \
            or cls is errors.MissingPluginError:
        cls = OperationalError
    error = cls(info["message"])
    error.result = result  # type: ignore[attr-defined]
    return error


class CompletionStream:
    """A streamed request: ``async for delta in host.stream(request)``; then ``stream.result``.

    The iteration raises the request's error when it fails (before or after
    its first piece), Cancelled when it was cancelled. Leaving the loop early
    cancels the request (see the module docstring), unless ``cancel_on_exit``
    is False (an HTTP client that disconnects: its request finishes and is
    stored, and a retry with the same request id gets the stored result).
    """

    def __init__(self, host: Host, request: CompletionRequest, *, cancel_on_exit: bool = True) -> None:
        self.host = host
        self.request = request
        self.cancel_on_exit = cancel_on_exit
        self.result: CompletionResult | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[ChatDelta]:
        rid = self.request.request_id
        sinks = self.host.streams
        if rid in sinks:
            raise ValidationError("request_id", f"{rid!r} is being streamed already")
        sink = sinks[rid] = StreamSink()
        submitted = finished = False
        try:
            ticket = await self.host.submit(self.request)
            submitted = True
            done = ticket.future
            done.add_done_callback(sink.wake)
            while True:
                while sink.pieces:
                    yield sink.pieces.popleft()
                if done.done():
                    break
                await sink.wait()
            result = self.result = done.result()
            finished = True
            if not sink.handed_out and result.ok:  # answered from the store: never streamed
                yield deltas_of(ProviderResponse(result.text or "", result.usage, result.model, result.session_id,
                                                 (result.message or {}).get("tool_calls"), result.finish_reason,
                                                 logprobs=result.logprobs,
                                                 system_fingerprint=result.system_fingerprint))
            if not result.ok:
                raise error_of(result)
        finally:
            if sinks.get(rid) is sink:
                del sinks[rid]
            if submitted and not finished:
                await self._abandon(sink)

    async def _abandon(self, sink: StreamSink) -> None:
        """The consumer left before the end: stop the streaming attempt, or cancel the request (unless
        ``cancel_on_exit`` is off: then the request goes on, and is stored, without it)."""
        sink.gone = True
        if not self.cancel_on_exit:
            return
        if sink.on_gone is not None:
            sink.on_gone()  # the attempt closes its upstream call; the request ends cancelled with what was received
        elif self.host.hooks.implemented("ksi_cancel"):
            await self.host.cancel(self.request.request_id)
