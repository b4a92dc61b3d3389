"""``ksi-host run``: a JSONL batch of requests through a Host.

Each input line is one JSON request. Lines that fail validation become
``error`` results naming the line and the field (a ``request_id`` that an
earlier line of the file has too included); the others are submitted in
input order (so each session keeps the order of its lines). A request without
``request_id`` gets one derived from its line number and text, so running
the same file again on the same database resumes instead of resending.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, TypeVar

from ..errors import OperationalError, ValidationError
from ..models import CompletionRequest, CompletionResult
from ..service import Host
from .progress import BatchStats, ProgressBar

#: Hooks a batch cannot run without (checked before anything runs).
REQUIRED_HOOKS = ("ksi_enqueue", "ksi_select_provider")

K = TypeVar("K")


async def submit_all(
    host: Host,
    items: Iterable[tuple[K, CompletionRequest | Mapping[str, Any]]],
    *,
    window: int,
    on_result: Callable[[K, CompletionResult], None],
    on_refused: Callable[[K, Any, OperationalError], None],
    on_submitted: Callable[[K], None] | None = None,
) -> None:
    """Submit each ``(key, request)`` of ``items`` to ``host`` in their order, at most ``window``
    unfinished at once; return once every result is in.

    ``on_result(key, result)`` is called as each request finishes, ``on_refused(key, request,
    error)`` when ``host.submit`` raised an OperationalError (the queue refused it), and
    ``on_submitted(key)`` once a request is accepted. A programming error (from ``submit``, a
    ticket, or a callback) stops the submission and is raised here.

    One task per request, in a task group, each started once a window slot is free. Tasks start
    in the order they are created and each runs into ``ksi_enqueue`` before its first suspension,
    so the queue sees the items in order while their group commits overlap.
    """
    slots = asyncio.Semaphore(window)

    async def submit(key: K, request: CompletionRequest | Mapping[str, Any]) -> None:
        try:
            try:
                ticket = await host.submit(request)
            except OperationalError as e:
                on_refused(key, request, e)
                return
            if on_submitted is not None:
                on_submitted(key)
            result = await ticket.future  # an exception here is a programming error (or the host stopping)
        finally:
            slots.release()
        on_result(key, result)

    try:
        async with asyncio.TaskGroup() as group:
            for key, request in items:
                await slots.acquire()
                group.create_task(submit(key, request))
    except BaseExceptionGroup as failed:  # the first programming error, as it was raised
        raise failed.exceptions[0] from None


GC_GEN0_THRESHOLD = 50_000
"""First-generation GC threshold :func:`tune_gc` sets (CPython's default is 700)."""


def tune_gc() -> None:
    """GC settings for a process that runs a batch and owns its interpreter (``ksi-host run``).

    Moves everything alive after start-up (modules, plugins, the host) out of the
    collector's sight with ``gc.freeze()`` and collects the youngest generation every
    ``GC_GEN0_THRESHOLD`` allocations instead of every 700: with thousands of requests
    in flight the default collects (and walks them all) every few requests. Not applied by
    :class:`~ksi_host.Host`: a library must not change its process's GC settings.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


INPUT_ENCODING = "utf-8-sig"
"""How request files are read: UTF-8, a byte-order mark at the start skipped."""
INPUT_ERRORS = "surrogateescape"
"""Bytes that are not UTF-8 become lone surrogates: that line is rejected, naming the field; the others run."""


def open_requests(path: str) -> IO[str]:
    """A request file opened for :func:`read_lines` (``-``: stdin), decoded as above."""
    if path == "-":
        import io
        import sys

        return io.TextIOWrapper(sys.stdin.buffer, encoding=INPUT_ENCODING, errors=INPUT_ERRORS)
    return open(path, encoding=INPUT_ENCODING, errors=INPUT_ERRORS)  # noqa: SIM115


def line_request_id(lineno: int, text: str) -> str:
    """The request id given to a line that has none: stable across reruns of the same file."""
    return f"line{lineno}-{hashlib.sha256(text.strip().encode('utf-8', INPUT_ERRORS)).hexdigest()[:16]}"


def parse_line(lineno: int, text: str) -> CompletionRequest | CompletionResult:
    """A request, or an ``error`` result naming the line and the field."""
    request_id = line_request_id(lineno, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return _rejected(request_id, ValidationError("json", f"not valid JSON ({e.msg} at column {e.colno})", line=lineno))
    if isinstance(data, dict) and _text(data.get("request_id")):
        request_id = data["request_id"]  # (an id that cannot be written out keeps the line's own)
    elif isinstance(data, dict) and data.get("request_id") is None:
        data["request_id"] = request_id
    try:
        return CompletionRequest.from_dict(data)
    except ValidationError as e:
        return _rejected(request_id, e.at_line(lineno), data)
    except TypeError as e:  # a wrong shape attrs itself caught
        return _rejected(request_id, ValidationError("request", str(e), line=lineno), data)


def _text(value: Any) -> str | None:
    """``value`` if it is text that can be written out (UTF-8: no lone surrogate), else None."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _rejected(request_id: str, error: ValidationError, data: Any = None) -> CompletionResult:
    d = data if isinstance(data, dict) else {}
    # the rejected line's own model and session, when they can be written to the results file
    return CompletionResult.failed(request_id, error, model=_text(d.get("model")), session_id=_text(d.get("session_id")))


def read_lines(stream: IO[str]) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers."""
    return [(n, line) for n, line in enumerate(stream, 1) if line.strip()]


class BatchRunner:
    """Runs parsed lines through ``host`` and writes one result per line to ``out``."""

    def __init__(self, host: Host, out: IO[str], progress_stream: IO[str], window: int = 2000) -> None:
        self.host = host
        self.out = out
        self.window = window
        self.stats = BatchStats(0)
        self.progress = ProgressBar(self.stats, progress_stream)
        self._served: dict[str, bool] = {}

    def write(self, result: CompletionResult, *, rejected: bool = False) -> None:
        self.out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        self.out.flush()
        self.stats.add(result, rejected=rejected)
        self.progress.update()

    async def _served_model(self, model: str) -> bool:
        served = self._served.get(model)
        if served is None:
            served = self._served[model] = bool(await self.host.providers(model))
        return served

    async def _tick(self) -> None:
        """Keep the bar moving (rate, ETA) while nothing finishes."""
        while True:
            await asyncio.sleep(self.progress.interval)
            self.progress.update()

    def _refused(self, lineno: int, request: CompletionRequest, e: OperationalError) -> None:
        """The queue refused this request (ksi_enqueue may): its error result."""
        if isinstance(e, ValidationError) and e.line is None:
            e = e.at_line(lineno)
        self.write(CompletionResult.failed(request.request_id, e, model=request.model, session_id=request.session_id),
                   rejected=True)

    def _submitted(self, lineno: int) -> None:
        self.stats.submitted += 1

    async def run(self, lines: Iterable[tuple[int, str]]) -> BatchStats:
        parsed = [(n, parse_line(n, text)) for n, text in lines]
        self.stats.total = len(parsed)
        ticker = asyncio.ensure_future(self._tick()) if self.progress.enabled else None
        try:
            accepted = []
            first_line: dict[str, int] = {}  # request id -> the line that has it
            for lineno, item in parsed:
                if isinstance(item, CompletionRequest) and first_line.setdefault(item.request_id, lineno) != lineno:
                    # the queue would answer it with the other line's result: this line would be lost unseen
                    item = _rejected(item.request_id, ValidationError(
                        "request_id", f"{item.request_id!r} is the request id of line {first_line[item.request_id]} too "
                        "(request ids must be unique within a file)", line=lineno),
                        {"model": item.model, "session_id": item.session_id})
                if isinstance(item, CompletionRequest) and not await self._served_model(item.model):
                    known = sorted({p.model for p in await self.host.providers(None)})
                    item = _rejected(item.request_id, ValidationError(
                        "model", f"no provider serves model {item.model!r} (configured models: {', '.join(known) or 'none'})",
                        line=lineno), {"model": item.model, "session_id": item.session_id})
                if isinstance(item, CompletionResult):
                    self.write(item, rejected=True)
                else:
                    accepted.append((lineno, item))
            await submit_all(self.host, accepted, window=self.window, on_result=lambda _, result: self.write(result),
                             on_refused=self._refused, on_submitted=self._submitted)
        finally:
            if ticker is not None:
                ticker.cancel()
            self.progress.close()
        return self.stats
