"""``ksi-host run``: a JSONL batch of requests through a Host.

Each input line is one JSON request, read as the window has room (the file's size does not
bound memory). Lines that fail validation become ``error`` results naming the line and the
field (a ``request_id`` that an earlier line of the file has too included); the others are
submitted in input order (so each session keeps the order of its lines). A request without
``request_id`` gets one derived from its line number and text, so running the same file again
on the same database resumes instead of resending: the queue answers a request whose final
result is stored from the store, before any provider is looked for. A request whose model
nothing serves fails when it runs (``NoProviderError``); its result is written as the line's
``model`` error.

Lines are read and results written in a :class:`~ksi_host.cli.formats.LineFormat`: the host's own
(``ksi``, above) or OpenAI's Batch format (:mod:`ksi_host.cli.openai_batch`: ``custom_id`` is the
request id, the output lines are OpenAI's).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import IO, Any, TypeVar

import attrs

from ..errors import OperationalError, ValidationError
from ..models import CompletionRequest, CompletionResult
from ..service import Host
from .formats import INPUT_ERRORS, KsiFormat, LineFormat, Rejected, line_request_id  # noqa: F401 (line_request_id: its old home)
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


INPUT_ENCODING = "utf-8-sig"
"""How request files are read: UTF-8, a byte-order mark at the start skipped."""


def open_requests(path: str) -> IO[str]:
    """A request file opened for :func:`iter_lines` (``-``: stdin), decoded as above."""
    if path == "-":
        import io
        import sys

        return io.TextIOWrapper(sys.stdin.buffer, encoding=INPUT_ENCODING, errors=INPUT_ERRORS)
    return open(path, encoding=INPUT_ENCODING, errors=INPUT_ERRORS)  # noqa: SIM115


MAX_LINE_CHARS = 64 * 1024 * 1024
"""A line longer than this many characters is refused without being read whole (:class:`LongLine`), so
memory stays bounded whatever the input (a file without line breaks, ``/dev/zero``). OpenAI allows a
request payload of 50 MB at most (images included): such a line fits."""

_SKIP_CHARS = 1024 * 1024  # the rest of a long line is read (and dropped) this much at a time


class LongLine(str):
    """The first characters of a line longer than :data:`MAX_LINE_CHARS`; the rest was skipped unread."""

    KEPT = 200


def iter_lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers, read as they are asked for; a line longer than
    :data:`MAX_LINE_CHARS` as a :class:`LongLine` (its first characters only)."""
    readline, max_chars = stream.readline, MAX_LINE_CHARS
    n = 0
    while line := readline(max_chars + 1):
        n += 1
        if len(line) > max_chars and not line.endswith("\n"):  # too long: skip to the next line break
            while (rest := readline(_SKIP_CHARS)) and not rest.endswith("\n"):
                pass
            yield n, LongLine(line[:LongLine.KEPT])
        elif line.strip():
            yield n, line


def read_lines(stream: IO[str]) -> list[tuple[int, str]]:
    """:func:`iter_lines` all at once (``ksi-host run`` streams its input instead)."""
    return list(iter_lines(stream))


def count_lines(path: str) -> int | None:
    """How many request lines the file at ``path`` holds: the bar's total. None for what can be read
    only once (``-``, stdin, a pipe): its total is known when it has been read."""
    import os

    if path == "-" or not os.path.isfile(path):
        return None
    with open_requests(path) as f:
        return sum(1 for _ in iter_lines(f))


def parse_line(lineno: int, text: str) -> CompletionRequest | CompletionResult:
    """A line of the ``ksi`` format: a request, or an ``error`` result naming the line and the field."""
    item = KsiFormat().parse(lineno, text)
    return item.result() if isinstance(item, Rejected) else item


def _unserved_model(result: CompletionResult) -> bool:
    """Did ``result`` fail because no provider serves its model at all (no attempt reached one)?"""
    return (result.error is not None and result.error.get("type") == "NoProviderError"
            and all(a.provider is None for a in result.attempts))


class RequestIds:
    """The request ids of a file's lines so far, to find a line that repeats an earlier one.

    Holds each id's ``hash()`` (64 bits) and its line, not the id itself: about 115 bytes a line
    (1M lines of 30-character ids: 115 MB instead of 190 MB). Two different ids share a hash with a
    probability of about n^2 / 2^65 (3e-8 for a million lines); the later one is then reported as
    a repeat.
    """

    def __init__(self) -> None:
        self._lines: dict[int, int] = {}

    def first_line(self, request_id: str, lineno: int) -> int | None:
        """The earlier line with ``request_id``, or None (and ``lineno`` is now its line)."""
        earlier = self._lines.setdefault(hash(request_id), lineno)
        return None if earlier == lineno else earlier


SETTLE_POLL_S = 0.01
"""After a stop, how often :meth:`BatchRunner.run` looks whether the running requests are written."""


class BatchRunner:
    """Runs request lines through ``host`` and writes one result per line to ``out``.

    Lines are read as the window has room, so a file of any size runs in memory bounded by
    the window. :meth:`stop` (the first Ctrl-C) reads no more lines and drains the host
    (``host.drain()``: the queue starts no more requests); :meth:`run` then returns once the
    requests that were running have their results stored and written. The others stay stored
    unfinished: a rerun finishes them. "Running" on the progress bar: this batch's requests
    among ``host.executing``.
    """

    def __init__(self, host: Host, out: IO[str], progress_stream: IO[str], window: int = 2000,
                 total: int | None = None, progress: bool | None = None, line_format: LineFormat | None = None) -> None:
        self.host = host
        self.out = out
        self.format = line_format if line_format is not None else KsiFormat()
        self.window = window
        self.stats = BatchStats(total)
        self.progress = ProgressBar(self.stats, progress_stream, self.in_flight, enabled=progress)
        self.stopping = False
        self._stopped = asyncio.Event()
        self._draining: asyncio.Future[None] | None = None  # host.drain(), from the first stop()
        self._ids = RequestIds()
        self._unwritten: set[str] = set()  # request ids submitted whose result is not written yet
        self._taken = self._answered = 0  # requests handed to host.submit; of those, accepted or refused
        self.output_error: OSError | None = None  # why ``out`` could not be written (the batch then stopped)

    def stop(self) -> None:
        """Read no more lines, start no more requests; the running ones finish (see the class docstring)."""
        self.stopping = self.progress.stopping = True
        if self._draining is None:
            self._draining = asyncio.ensure_future(self.host.drain())  # at once: nothing starts from now on
        self._stopped.set()

    def in_flight(self) -> tuple[int, int]:
        """(running, queued): this batch's requests that the host executes now, and the rest of those submitted."""
        unwritten = self._unwritten
        running = sum(1 for rid in self.host.executing if rid in unwritten)
        return running, len(self._unwritten) - running

    def write(self, result: CompletionResult, *, rejected: Rejected | None = None) -> None:
        """Write the output line of ``result``; ``rejected``: the line never reached the queue, and why.

        When ``out`` cannot be written (a full disk, a closed pipe), the batch stops as at a Ctrl-C
        (:meth:`stop`): the running requests finish and are stored, a rerun writes every result.
        The error is kept in :attr:`output_error`; no more lines are written."""
        if self.output_error is None:
            try:
                self.out.write(json.dumps(self.format.render(result, rejected), ensure_ascii=False) + "\n")
                self.out.flush()
            except OSError as e:
                self.output_error = e
                self.stop()
        if self.output_error is not None:
            return  # not written: counted as not finished (the rerun writes it)
        self.stats.add(result, rejected=rejected is not None)
        self.progress.update()

    def _requests(self, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[tuple[int, str], CompletionRequest]]:
        """The valid requests of ``lines``, keyed by (line, request id); bad lines are written as they are met."""
        for lineno, text in lines:
            if self.stopping:
                return
            self.stats.read += 1
            if isinstance(text, LongLine):
                item: CompletionRequest | Rejected = Rejected(line_request_id(lineno, text), ValidationError(
                    "line", f"longer than {MAX_LINE_CHARS:,} characters (not read)", line=lineno), own_id=False)
            else:
                item = self.format.parse(lineno, text)
            if isinstance(item, CompletionRequest):
                earlier = self._ids.first_line(item.request_id, lineno)
                if earlier is not None:
                    # the queue would answer it with the other line's result: this line would be lost unseen
                    name = self.format.id_field
                    item = Rejected(item.request_id, ValidationError(
                        name, f"{item.request_id!r} is the {name} of line {earlier} too "
                        f"({name}s must be unique within a file)", line=lineno), item.model, item.session_id)
            if isinstance(item, Rejected):
                self.write(item.result(), rejected=item)
                continue
            self._taken += 1
            yield (lineno, item.request_id), item
        if self.stats.total is None:
            self.stats.total = self.stats.read  # the whole input was read: now the total is known

    def _submitted(self, key: tuple[int, str]) -> None:
        self._answered += 1
        self._unwritten.add(key[1])
        self.stats.submitted += 1

    def _finished(self, key: tuple[int, str], result: CompletionResult) -> None:
        lineno, rid = key
        self._unwritten.discard(rid)
        if _unserved_model(result):
            # a model nothing serves is the line's fault; it is found only after a stored result was looked for
            error = ValidationError(self.format.field("model"), result.error["message"], line=lineno)  # type: ignore[index]
            result = attrs.evolve(result, error=error.to_dict())
            self.write(result, rejected=Rejected(rid, error, result.model, result.session_id, cause="NoProviderError"))
            return
        self.write(result)

    def _refused(self, key: tuple[int, str], request: CompletionRequest, e: OperationalError) -> None:
        """The queue refused this request (ksi_enqueue may): its error result."""
        self._answered += 1
        if isinstance(e, ValidationError):
            e = ValidationError(self.format.field(e.field), e.reason, line=key[0] if e.line is None else e.line)
        rejected = Rejected(request.request_id, e, request.model, request.session_id)
        self.write(rejected.result(), rejected=rejected)

    async def _tick(self) -> None:
        """Keep the bar moving (rate, ETA) while nothing finishes."""
        while True:
            await asyncio.sleep(self.progress.interval)
            self.progress.update()

    async def _settled(self) -> None:
        """After :meth:`stop`: return once the host is drained (no request runs; those that ran have their
        results stored and their tickets completed), no submission is under way, and every result whose
        ticket completed is written."""
        assert self._draining is not None
        await self._draining
        while self._taken > self._answered or self.host.executing:  # a request accepted meanwhile starts nothing
            await asyncio.sleep(SETTLE_POLL_S)
        await asyncio.sleep(0)  # the tickets the drain completed wake their submissions: their results are written

    async def run(self, lines: Iterable[tuple[int, str]]) -> BatchStats:
        if self.stats.total is None and isinstance(lines, Sized):
            self.stats.total = len(lines)
        ticker = asyncio.ensure_future(self._tick()) if self.progress.enabled else None
        submitting = asyncio.ensure_future(submit_all(
            self.host, self._requests(lines), window=self.window, on_result=self._finished, on_refused=self._refused,
            on_submitted=self._submitted))
        stopped = asyncio.ensure_future(self._stopped.wait())
        waits = [submitting, stopped]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not submitting.done():  # stopped: the requests still queued are left to the next run
                waits.append(asyncio.ensure_future(self._settled()))
                await asyncio.wait([submitting, waits[-1]], return_when=asyncio.FIRST_COMPLETED)
            if submitting.done():
                submitting.result()  # a programming error is raised here
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
            self.progress.close()
        return self.stats
