"""The queue's rows: conversions and batched reads and writes through ``host.db``.

Submissions are batched: the requests accepted during one turn of the event
loop are inserted in one transaction that skips request ids stored before and
counts what it inserted; only when it inserted fewer than it was given does a
``SELECT ... IN (...)`` find the rows stored before. Lookups and loads of
restored requests are batched the same way. Running marks and final
results go through one writer that hands ``host.db.write_batch`` everything
finished meanwhile, ordered by statement so the host's group commit runs each
kind through one ``executemany`` in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ksi_host.chat import PARAMETERS
from ksi_host.db import Database
from ksi_host.errors import DatabaseError, ValidationError
from ksi_host.models import Attempt, CompletionRequest, CompletionResult, Usage

from . import schema
from .scheduler import Entry

log = logging.getLogger("ksi_host.queue")

CHUNK = 500  # ids per SELECT ... IN (...)
MARK_DELAY_S = 0.05  # a request still running this long after it started gets its running mark written


class Stored:
    """A request found in the table: its ``seq``, its ``request_hash`` (None in rows stored before
    migration 3), and its ``result`` if final."""

    __slots__ = ("seq", "status", "request_hash", "result")

    def __init__(self, seq: int, status: str, request_hash: str | None, result: CompletionResult | None) -> None:
        self.seq = seq
        self.status = status
        self.request_hash = request_hash
        self.result = result

    @property
    def final(self) -> bool:
        return self.result is not None


# -- conversions ----------------------------------------------------------------


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

HASHED_FIELDS = ("model", "messages", *PARAMETERS, "provider_options", "continue_session")
"""What a request asks (what changes the question sent upstream), for the check of a request id submitted
again: the same id with any of these different is refused. Who asks and how it is scheduled (session, agent,
purpose, priority, timeout, metadata) may differ: the stored result still answers the question."""

_scalars = operator.attrgetter(*schema.SCALAR_PARAMETERS)
_documents = operator.attrgetter(*schema.DOCUMENTS)


def _json(value: Any, field: str) -> str:
    if not value:
        return "{}" if isinstance(value, dict) else "[]"
    try:
        return _encode(value)
    except (TypeError, ValueError) as e:
        raise ValidationError(field, f"must be JSON-serialisable to be queued ({e})") from None


def _document_json(name: str, value: Any) -> str | None:
    """A document field as stored: JSON text, or NULL when unset (an empty list or object is set: it stays one)."""
    if value is None:
        return None
    try:
        return _encode(value)
    except (TypeError, ValueError) as e:
        raise ValidationError(name, f"must be JSON-serialisable to be queued ({e})") from None


def request_hash(r: CompletionRequest, messages_json: str, scalars: tuple[Any, ...] | None = None,
                 documents_json: tuple[str | None, ...] | None = None) -> str:
    """A hash of the ``HASHED_FIELDS`` of ``r`` (``messages_json``: its messages as stored; ``scalars`` and
    ``documents_json``: its ``SCALAR_PARAMETERS`` and ``DOCUMENTS`` as stored, if at hand).

    The fields beyond model, messages, max_tokens and temperature count only when set, so a request that sets
    none of them has the hash rows stored before migration 4 were given. (The hash is a quick check: when it
    differs, the stored request is loaded and compared by value.)"""
    if scalars is None:
        scalars = _scalars(r)
    if documents_json is None:
        documents_json = tuple(_document_json(name, v) for name, v in zip(schema.DOCUMENTS, _documents(r), strict=True))
    text = f"{r.model}\x00{r.max_tokens!r}\x00{r.temperature!r}\x00{messages_json}"
    if scalars.count(None) != len(scalars):
        for name, value in zip(schema.SCALAR_PARAMETERS, scalars, strict=True):
            if value is not None:
                text += f"\x00{name}={value!r}"
    if documents_json.count(None) != len(documents_json):
        for name, doc in zip(schema.DOCUMENTS, documents_json, strict=True):
            if doc is not None:
                text += f"\x00{name}={doc}"
    if r.continue_session:
        text += "\x00continue_session"
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def hash_of(r: CompletionRequest) -> str:
    """The request hash of ``r`` (as :func:`request_params` stores it)."""
    return request_hash(r, _json(r.messages, "messages"))


def differences(stored: CompletionRequest, new: CompletionRequest) -> list[str]:
    """The ``HASHED_FIELDS`` whose values differ (by value: key order in a message, 1 or 1.0, do not count)."""
    return [name for name in HASHED_FIELDS if getattr(stored, name) != getattr(new, name)]


class Accepting(NamedTuple):
    """What accepting a request writes: its ``ksi_queue_requests`` row and its ``ksi_queue_payloads`` row
    (values for ``schema.INSERT_REQUEST_NEW[len(row)]`` and ``schema.INSERT_PAYLOAD_NEW[len(payload)]``), and its
    request hash (also in the row)."""

    row: tuple[Any, ...]
    payload: tuple[Any, ...]
    hash: str


def request_params(seq: int | None, r: CompletionRequest, created_at: float) -> Accepting:
    """The rows accepting ``r`` writes (seq, the request's fields and its hash; seq, messages, metadata and the
    documents). With ``seq`` None SQLite numbers the row."""
    messages = _json(r.messages, "messages")
    scalars = _scalars(r)
    documents = _documents(r)
    if documents.count(None) != len(documents):
        documents = tuple(_document_json(name, v) for name, v in zip(schema.DOCUMENTS, documents, strict=True))
    hashed = request_hash(r, messages, scalars, documents)
    row: tuple[Any, ...] = (seq, r.request_id, r.session_id, r.agent_id, r.originator_agent_id, r.purpose, r.model,
                            r.priority, r.max_tokens, r.temperature, r.timeout_s, created_at, hashed)
    if scalars.count(None) != len(scalars) or r.continue_session:  # (else the chat columns are left out: NULL)
        row += (*scalars, r.continue_session)
    payload: tuple[Any, ...] = (seq, messages, _json(r.metadata, "metadata"))
    if documents.count(None) != len(documents):  # (likewise the document columns)
        payload += documents
    return Accepting(row, payload, hashed)


def request_from_row(row: Any) -> CompletionRequest:
    """The request a row of :func:`schema.select_requests` holds, as it was submitted."""
    fields = {name: row[name] for name in schema.REQUEST_FIELDS}
    for name in schema.BOOLEAN_PARAMETERS:
        if fields[name] is not None:
            fields[name] = bool(fields[name])
    fields["continue_session"] = bool(fields["continue_session"])
    for name in schema.DOCUMENTS:
        text = row[f"{name}_json"]
        if text is not None:
            fields[name] = json.loads(text)
    return CompletionRequest(request_id=row["request_id"], messages=json.loads(row["messages_json"]),
                             metadata=json.loads(row["metadata_json"]), **fields)


def _message_json(r: CompletionResult) -> str | None:
    """The assistant message as stored: without its content when that is the result's text (as in every result
    of ``host.execute``), which ``result_text`` holds already: an answer is stored once, not twice."""
    m = r.message
    if m is None:
        return None
    if "content" in m and m["content"] == r.text:
        m = {k: v for k, v in m.items() if k != "content"}
    return _encode(m)


def _message(text: str | None, stored: str | None) -> dict[str, Any] | None:
    """The assistant message from ``result_message_json`` (its content put back from ``result_text``)."""
    if stored is None:
        return None
    m = json.loads(stored)
    if "content" in m:
        return m
    message = {"role": m.pop("role")} if "role" in m else {}
    message["content"] = text
    message.update(m)
    return message


def result_params(seq: int, r: CompletionResult) -> tuple[Any, ...]:
    u = r.usage
    err = r.error or {}
    return (
        r.status, r.started_at, r.finished_at, r.text, r.model, r.provider, r.session_id,
        u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cost_usd, u.cached_tokens, u.reasoning_tokens,
        err.get("type"), err.get("message"), r.finish_reason, _message_json(r),
        None if r.logprobs is None else _encode(r.logprobs), r.system_fingerprint, seq,
    )


def attempt_params(request_id: str, a: Attempt) -> tuple[Any, ...]:
    return (request_id, a.number, a.provider, a.error_type, a.error_message, a.delay_s, a.latency_ms, a.ttft_ms)


def result_from_row(row: Any, attempts: Sequence[Attempt] = ()) -> CompletionResult:
    """The final result a row holds (the columns of ``schema.RESULT_COLUMNS``), as it was first returned."""
    error = None
    if row["error_type"] is not None:
        error = {"type": row["error_type"], "message": row["error_message"]}
    usage = Usage(row["prompt_tokens"] or 0, row["completion_tokens"] or 0, row["total_tokens"] or 0, row["cost_usd"],
                  row["cached_tokens"], row["reasoning_tokens"])
    return CompletionResult(
        row["request_id"],
        row["status"],
        text=row["result_text"],
        model=row["result_model"],
        provider=row["result_provider"],
        session_id=row["result_session_id"],
        usage=usage,
        attempts=tuple(attempts),
        error=error,
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        message=_message(row["result_text"], row["result_message_json"]),
        finish_reason=row["finish_reason"],
        submitted_at=row["created_at"],
        logprobs=None if row["result_logprobs_json"] is None else json.loads(row["result_logprobs_json"]),
        system_fingerprint=row["system_fingerprint"],
    )


def attempt_from_row(row: Any) -> Attempt:
    return Attempt(row["number"], row["provider"], row["error_type"], row["error_message"], row["delay_s"],
                   row["latency_ms"], row["ttft_ms"])


# -- the store ---------------------------------------------------------------------


class QueueStore:
    """Batched access to the queue's tables. ``on_saved(items)`` is called with
    the ``(entry, result)`` pairs of each committed write; ``on_save_failed(items,
    exc)`` when their transaction failed."""

    def __init__(
        self,
        db: Database,
        on_saved: Callable[[list[tuple[Entry, CompletionResult]]], None],
        on_save_failed: Callable[[list[tuple[Entry, CompletionResult]], BaseException], None],
    ) -> None:
        self.db = db
        self.on_saved = on_saved
        self.on_save_failed = on_save_failed
        self._asked: dict[str, tuple[asyncio.Future[Stored | None], Any]] = {}
        self._ask_task: asyncio.Task[None] | None = None
        self._loads: dict[int, asyncio.Future[CompletionRequest]] = {}
        self._load_task: asyncio.Task[None] | None = None
        self._marks: dict[int, float] = {}  # seq -> when it started, in start order
        self._draining = False
        self._results: list[tuple[Entry, CompletionResult]] = []
        self._writer: asyncio.Task[None] | None = None
        self._mark_timer: asyncio.TimerHandle | None = None

    async def migrate(self) -> None:
        await self.db.migrate(schema.OWNER, schema.MIGRATIONS)

    async def max_seq(self) -> int:
        row = await self.db.fetchone(schema.SELECT_MAX_SEQ)
        return int(row[0]) if row else 0

    async def unfinished(self) -> list[Any]:
        """``(seq, request_id, session_id, model, priority, created_at)`` of every queued or running row, by seq."""
        return await self.db.fetchall(schema.SELECT_UNFINISHED)

    async def cancel_stored(self, request_id: str, message: str, owner: tuple[Any, Any]) -> bool:
        """Cancel the unfinished row of ``request_id`` if the owner row is still ``owner`` ((pid, started_at)
        of a process that is gone, or (None, None): no owner). True if it was cancelled."""
        now = time.time()
        return bool(await self.db.write_batch([(schema.CANCEL_STORED, (now, now, message, request_id, *owner))], count=True))

    async def clear_stored(self, session_id: str, message: str, owner: tuple[Any, Any]) -> list[str]:
        """Cancel the queued rows of ``session_id`` if the owner row is still ``owner``; their request ids."""
        now = time.time()
        if not await self.db.write_batch([(schema.CLEAR_STORED, (now, now, message, session_id, *owner))], count=True):
            return []
        return [rid for (rid,) in await self.db.fetchall(schema.SELECT_CLEARED, (session_id, now, message))]

    async def accept_unserved(self, params: Accepting,
                              owner: tuple[Any, Any]) -> Stored | None | bool:
        """Store a request (``request_params`` with seq None) for the next serving process, if the owner row is
        still ``owner``. None once stored; the row found if its id was stored before; False if the owner row
        changed (a process started serving: nothing was stored)."""
        row, payload = params.row, params.payload
        rid = row[1]
        inserted = await self.db.write_batch([(schema.INSERT_REQUEST_UNSERVED[len(row)], (*row, *owner)),
                                              (schema.INSERT_PAYLOAD_UNSERVED[len(payload)], (*payload[1:], rid))],
                                             count=True)
        if inserted:
            return None
        return (await self.fetch_stored([rid])).get(rid, False)

    # -- batched reads ---------------------------------------------------------

    def lookup(self, request_id: str) -> asyncio.Future[Stored | None]:
        """The stored row of ``request_id`` (with its result if final), or None."""
        return self._ask(request_id, None)

    def accept(self, request_id: str, params: Accepting) -> asyncio.Future[Stored | None]:
        """Store a request (``request_params``) unless its id is already stored.

        The future gives None once the new row is committed, or the row found
        (with its result if final) when the id was stored before. The requests
        accepted during one turn of the event loop share one ``SELECT`` and one
        ``executemany`` (one group commit)."""
        return self._ask(request_id, params)

    def _ask(self, request_id: str, params: Any) -> asyncio.Future[Stored | None]:
        asked = self._asked.get(request_id)
        if asked is not None:  # asked twice in one turn: one answer (storing it if either asked to)
            if params is not None and asked[1] is None:
                self._asked[request_id] = (asked[0], params)
            return asked[0]
        fut = asyncio.get_running_loop().create_future()
        self._asked[request_id] = (fut, params)
        if self._ask_task is None:
            self._ask_task = asyncio.ensure_future(self._ask_loop())
        return fut

    async def _ask_loop(self) -> None:
        try:
            while self._asked:
                batch, self._asked = self._asked, {}
                try:
                    found = await self._settle(batch)
                except BaseException as exc:  # handed to every waiter, never dropped
                    for fut, _ in batch.values():
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):  # cancelled, interrupted: stop here too
                        raise
                    continue
                for rid, (fut, _) in batch.items():
                    if not fut.done():
                        fut.set_result(found.get(rid))
        finally:
            self._ask_task = None

    async def _settle(self, batch: dict[str, tuple[Any, Any]]) -> dict[str, Stored]:
        """Store the new requests of ``batch``; return the rows stored before of every id it holds."""
        new = {rid: params for rid, (_, params) in batch.items() if params is not None}
        if not new:
            return await self.fetch_stored(list(batch))
        statements = [(schema.INSERT_REQUEST_NEW[len(a.row)], a.row) for a in new.values()]
        statements += [(schema.INSERT_PAYLOAD_NEW[len(a.payload)], a.payload) for a in new.values()]
        inserted = await self.db.write_batch(statements, count=True)
        lookups = [rid for rid in batch if rid not in new]
        if inserted == 2 * len(new):  # every request and payload inserted: none was stored before
            return await self.fetch_stored(lookups) if lookups else {}
        # some were stored before (by another process, or before a restart): those rows' seq is not ours
        found = await self.fetch_stored(list(batch))
        return {rid: s for rid, s in found.items() if rid not in new or s.seq != new[rid].row[0]}

    async def fetch_stored(self, ids: list[str]) -> dict[str, Stored]:
        found: dict[str, Stored] = {}
        final_rows = []
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i:i + CHUNK]
            for row in await self.db.fetchall(schema.select_results(len(chunk)), chunk):
                if row["status"] in schema.FINAL:
                    final_rows.append(row)
                else:
                    found[row["request_id"]] = Stored(row["seq"], row["status"], row["request_hash"], None)
        if final_rows:
            attempts: dict[str, list[Attempt]] = {}
            final_ids = [row["request_id"] for row in final_rows]
            for i in range(0, len(final_ids), CHUNK):
                chunk = final_ids[i:i + CHUNK]
                for a in await self.db.fetchall(schema.select_attempts(len(chunk)), chunk):
                    attempts.setdefault(a["request_id"], []).append(attempt_from_row(a))
            for row in final_rows:
                rid = row["request_id"]
                found[rid] = Stored(row["seq"], row["status"], row["request_hash"], result_from_row(row, attempts.get(rid, ())))
        return found

    def load(self, seq: int) -> asyncio.Future[CompletionRequest]:
        """The stored request of row ``seq`` (a restored entry about to run)."""
        fut = self._loads.get(seq)
        if fut is None:
            fut = self._loads[seq] = asyncio.get_running_loop().create_future()
            if self._load_task is None:
                self._load_task = asyncio.ensure_future(self._load_loop())
        return fut

    async def _load_loop(self) -> None:
        try:
            while self._loads:
                batch, self._loads = self._loads, {}
                seqs = list(batch)
                try:
                    rows = {}
                    for i in range(0, len(seqs), CHUNK):
                        chunk = seqs[i:i + CHUNK]
                        for row in await self.db.fetchall(schema.select_requests(len(chunk)), chunk):
                            rows[row["seq"]] = row
                except BaseException as exc:  # handed to every waiter, never dropped
                    for fut in batch.values():
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):  # cancelled, interrupted: stop here too
                        raise
                    continue
                for seq, fut in batch.items():
                    if fut.done():
                        continue
                    row = rows.get(seq)
                    if row is None:
                        fut.set_exception(LookupError(f"ksi-queue: row {seq} of ksi_queue_requests vanished"))
                        continue
                    try:
                        fut.set_result(request_from_row(row))
                    except Exception as exc:  # a stored request that no longer validates: its run's error
                        fut.set_exception(exc)
        finally:
            self._load_task = None

    # -- the writer -------------------------------------------------------------

    def mark_running(self, seq: int, now: float) -> None:
        """Record that row ``seq`` started. Not awaited (restore treats running like queued). A request
        still running ``MARK_DELAY_S`` after it started gets its mark with the next results, or on its
        own; one whose result is stored sooner never needs one (most of them: a mark is a write)."""
        self._marks[seq] = now
        if self._mark_timer is None:
            self._mark_timer = asyncio.get_running_loop().call_later(MARK_DELAY_S, self._marks_due)

    def _marks_due(self) -> None:
        self._mark_timer = None
        if self._marks and self._writer is None:
            self._writer = asyncio.ensure_future(self._write_loop())

    def _due_marks(self) -> list[tuple[float, int]]:
        """Take the marks of the requests that started ``MARK_DELAY_S`` ago or earlier (every mark when
        draining); arm the timer for the next one."""
        marks = self._marks
        if not marks:
            return []
        if self._draining:
            due = [(t, seq) for seq, t in marks.items()]
            marks.clear()
            return due
        limit = time.time() - MARK_DELAY_S + 0.001
        due = []
        for seq, t in marks.items():
            if t > limit:
                break
            due.append((t, seq))
        for _, seq in due:
            del marks[seq]
        if marks and self._mark_timer is None:
            wait = next(iter(marks.values())) - limit
            self._mark_timer = asyncio.get_running_loop().call_later(max(0.0, wait), self._marks_due)
        return due

    def save_result(self, e: Entry, result: CompletionResult) -> None:
        """Store the final ``result`` of ``e``; ``on_saved`` follows the commit."""
        self._marks.pop(e.seq, None)  # a final row needs no running mark
        self._results.append((e, result))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while True:
                results, self._results = self._results, []
                marks = self._due_marks()
                if not results and not marks:
                    break
                statements: list[tuple[str, Any]] = [(schema.MARK_RUNNING, m) for m in marks]
                statements += [(schema.STORE_RESULT, result_params(e.seq, r)) for e, r in results]
                statements += [
                    (schema.INSERT_ATTEMPT, attempt_params(r.request_id, a)) for _, r in results for a in r.attempts
                ]
                try:
                    await self.db.write_batch(statements)
                except Exception as exc:
                    if results:
                        self.on_save_failed(results, exc)
                    elif isinstance(exc, DatabaseError):  # only running marks were lost: restore treats running like
                        # queued anyway; an expected failure (a full disk), so one line, not a traceback
                        log.warning("ksi-queue: could not store the running marks of %d request(s): %s", len(marks), exc)
                    else:
                        asyncio.get_running_loop().call_exception_handler(
                            {"message": "ksi-queue: could not store running marks", "exception": exc})
                    continue
                if results:
                    self.on_saved(results)
        finally:
            self._writer = None

    async def drain(self) -> None:
        """Wait for every batched read and write started so far (shutdown); write every running mark."""
        self._draining = True
        if self._mark_timer is not None:
            self._mark_timer.cancel()
        self._marks_due()
        while True:
            tasks = [t for t in (self._ask_task, self._load_task, self._writer) if t is not None]
            if not tasks:
                return
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception):
                    raise outcome
