"""The ksi-queue plugin: accepts requests durably and runs them in order.

One :class:`Plugin` per Host. ``ksi_enqueue`` registers the request (its
place in its session is fixed at that moment), checks whether the request id
is already stored, stores it, and returns a ticket. The :class:`Scheduler`
decides what runs; a pool of worker tasks (at most one per slot, started as
needed) runs each started request's ``host.execute``, and its final result is
stored (group-committed) before its tickets complete and before the next
request of its session may start. A worker that finishes a request takes the
next started one at once: no task per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from collections import deque
from typing import Any

import ksi_host
from ksi_host.errors import Cancelled, DatabaseError, OperationalError, StartupError, ValidationError
from ksi_host.models import PRIORITIES, Attempt, CompletionRequest, CompletionResult, RequestQuery, Ticket, iso

from . import listing, schema
from .config import QueueConfig
from .owner import alive, process_start
from .scheduler import ACCEPTING, DONE, QUEUED, RUNNING, STORING, Entry, Scheduler
from .store import QueueStore, Stored, differences, hash_of, request_params

log = logging.getLogger("ksi_host.queue")

COMMAND_POLL_S = 0.2  # how often the serving process looks for commands from other processes
COMMAND_WAIT_S = 10.0  # how long another process waits for the serving process to answer
HELD_IN_MEMORY = 10_000
"""Beyond this many requests in memory, a request stored behind its session's head keeps only its row: its
fields are loaded from the table when its turn comes, as a restored request's are. benchmarks/scale.py (100,000
queued over 10,000 sessions): peak RSS 203 -> 139 MB; ksi-host run (a window of 2,000) never reaches it."""

# Databases served by a Host of this process: realpath -> plugin.
_SERVING: dict[str, Plugin] = {}


class ServedElsewhere(OperationalError):
    """Another process serves this queue; the operation must go through it."""


_OWNER_CHANGED = object()  # _cancel_row's answer when another process started serving meanwhile


def _owner_key(row: Any) -> tuple[Any, Any]:
    """What identifies an owner row in the statements that check it is unchanged: (pid, started_at), or (None, None)."""
    return (None, None) if row is None else (row["pid"], row["started_at"])


def _check_same_request(stored: CompletionRequest, request: CompletionRequest) -> None:
    """Raise ValidationError naming the request id and the fields in which ``request`` differs from ``stored``."""
    differ = differences(stored, request)
    if differ:
        raise ValidationError("request_id", f"{request.request_id!r} is already stored with a different request "
                              f"(differs in {', '.join(differ)}): a request id names one request; give this one its own "
                              "request_id")


def _db_key(path: str) -> str | None:
    """What identifies a database file across Hosts of this process (None: a private in-memory database)."""
    return None if path == ":memory:" or path.startswith("file::memory:") else os.path.realpath(path)


class Plugin:
    """The queue. See the package README for the behaviour and the tables."""

    def __init__(self) -> None:
        self.host: Any = None
        self.store: QueueStore | None = None
        self.sched: Scheduler | None = None
        self.entries: dict[str, Entry] = {}
        self.serving = False
        self.closing = False
        self.draining = False  # ksi_drain: nothing more starts
        self._drained: asyncio.Future[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()  # cancelled results on their way to the observers and the table
        self._reported: set[str] = set()  # running here, their result told to the observers: a cancel is too late
        self.seq = 0
        self._owner: tuple[int, float] | None = None
        self._key: str | None = None
        self._commands: asyncio.Task[None] | None = None
        self._unserved_tickets: list[Ticket] = []
        self._startable: deque[Entry] = deque()  # started (RUNNING) entries no worker has taken yet
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: deque[asyncio.Future[None]] = deque()  # one future per idle worker, woken to take an entry

    # -- life cycle -----------------------------------------------------------------

    @ksi_host.hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return ("queue", QueueConfig)

    @ksi_host.hookimpl
    async def ksi_startup(self, host: Any) -> None:
        cfg: QueueConfig = host.config["queue"]
        limit = host.concurrency if host.concurrency is not None else cfg.concurrency
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise StartupError(f"config key host.concurrency: must be a positive integer, got {limit!r}")
        self.host = host
        self.store = QueueStore(host.db, self._saved, self._save_failed)
        self.sched = Scheduler(limit, cfg.model_limits)
        try:
            await self.store.migrate()
            if host.serve:
                await self._claim()
                try:
                    self.seq = await self.store.max_seq()  # after the claim: no other process adds rows now
                    await self._restore()
                except BaseException:
                    await self._release()
                    raise
        except DatabaseError as e:  # found before any request ran: a start-up failure (ksi-host exits 2)
            if isinstance(e, StartupError):
                raise
            raise e.at_startup() from e
        if not host.serve:
            return
        self.serving = True
        self._pump()
        self._commands = asyncio.ensure_future(self._command_loop())

    async def _claim(self) -> None:
        """Become the one process serving this database. The owner row seen (none, or a process that is
        gone) is replaced by ours in one counted transaction: if another process claimed the queue since
        it was read, nothing changes, and that process is named."""
        db = self.host.db
        key = _db_key(db.path)
        if key is not None and key in _SERVING:
            raise StartupError(f"ksi-queue: another Host of this process already serves the queue in {db.path}")
        pid = os.getpid()
        while True:
            row = await db.fetchone(schema.SELECT_OWNER)
            if row is not None and row["pid"] != pid and alive(row["pid"], row["process_start"]):
                raise StartupError(
                    f"ksi-queue: the queue in {db.path} is served by process {row['pid']} (since {iso(row['started_at'])}); "
                    "stop it first: two serving processes would send the same requests twice"
                )
            started = time.time()
            claim = [(schema.CLAIM_OWNER, (pid, process_start(pid), started))]
            if row is not None:
                claim.insert(0, (schema.DELETE_OWNER, (row["pid"], row["started_at"])))
            if await db.write_batch(claim, count=True):
                break
        await db.execute(schema.EXPIRE_COMMANDS, (started,))
        await db.execute(schema.PURGE_COMMANDS, (started - 86400,))
        self._owner = (pid, started)
        self._key = key
        if key is not None:
            _SERVING[key] = self

    async def _release(self) -> None:
        """Stop being the serving process of this database."""
        if self._key is not None and _SERVING.get(self._key) is self:
            del _SERVING[self._key]
        self._key = None
        if self._owner is not None:
            owner, self._owner = self._owner, None
            await self.host.db.execute(schema.CLEAR_OWNER, owner)

    async def _restore(self) -> None:
        """Load every queued or running row, in submission order, as a light entry. Rows left ``running`` by a
        process that is gone are ``queued`` again: here, a row says ``running`` only while this process runs it."""
        await self.host.db.execute(schema.REQUEUE_RUNNING)
        entries = self.entries
        intern = sys.intern
        ranks = PRIORITIES
        restored = []
        for seq, rid, sid, model, priority, created_at in await self.store.unfinished():
            e = Entry(seq, rid, None if sid is None else intern(sid), intern(model), ranks.get(priority, 2), created_at,
                      None, QUEUED)
            entries[rid] = e
            restored.append(e)
        self.sched.restore(restored)
        if not self.host.resume:  # serve only what is submitted from now on: hold the rest
            self.sched.hold_through = self.seq

    @ksi_host.hookimpl
    async def ksi_shutdown(self, host: Any) -> None:
        if self.store is None:
            return
        self.closing = True
        self.serving = False
        problems: list[BaseException] = []
        if self._commands is not None:
            self._commands.cancel()
            outcome = (await asyncio.gather(self._commands, return_exceptions=True))[0]
            if isinstance(outcome, Exception):
                problems.append(outcome)
        workers = list(self._workers)
        for task in workers:
            task.cancel()  # a running request stays stored as queued/running and runs at the next start
        for outcome in await asyncio.gather(*workers, return_exceptions=True):
            if isinstance(outcome, Exception):
                problems.append(outcome)
        for outcome in await asyncio.gather(*self._reports, return_exceptions=True):  # cancels being reported: stored
            if isinstance(outcome, Exception):
                problems.append(outcome)
        await self.store.drain()
        stopped = Cancelled("the host stopped before this request finished; it stays stored and runs when a host "
                            "serves this database again")
        waiting = [t for e in self.entries.values() if e.error is None for t in e.tickets or ()]
        for t in waiting + self._unserved_tickets:
            if not t.is_done():
                t.set_exception(stopped)
                t.future.exception()  # an expected end, not an error to log if nobody awaits this ticket
        await self._release()
        await host.db.flush()
        if problems:
            raise problems[0]

    @ksi_host.hookimpl
    async def ksi_drain(self, host: Any) -> None:
        """Start nothing more; return once every request running here has its final result stored (and its
        tickets completed). Queued requests stay stored as they are: the next serving start runs them."""
        if not self.serving:
            return
        self.draining = True
        while self._busy():
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def _busy(self) -> bool:
        """Is a request running here, or a final result (a cancel's too) on its way to the table?"""
        return self.sched.in_flight > 0 or any(e.state == STORING for e in self.entries.values())

    # -- accepting --------------------------------------------------------------------

    @ksi_host.hookimpl
    async def ksi_enqueue(self, host: Any, request: CompletionRequest) -> Ticket:
        rid = request.request_id
        e = self.entries.get(rid)
        if e is not None:  # queued or running here: the same run, if it is the same request
            if e.request is None:  # restored: its request is still in the database
                stored = await self.store.lookup(rid)
                if stored is not None:
                    await self._check_same(request, hash_of(request), stored)
                if self.entries.get(rid) is not e:  # it finished meanwhile: answer from its stored row
                    return await self.ksi_enqueue(host, request)
            elif e.request is not request:
                _check_same_request(e.request, request)
            return self._attach(e)
        if self.closing:
            raise Cancelled(f"the queue is shutting down; request {rid} was not accepted")
        if not self.serving:
            return await self._enqueue_unserved(request)
        if self.sched.held_session(request.session_id):
            raise ValidationError("session_id", f"request {rid} cannot start: the queue in {host.db.path} holds "
                                  f"unfinished requests of an earlier run ahead of it in session {request.session_id!r}, "
                                  "which this host does not start (it serves only the requests submitted to it)")
        now = time.time()
        params = request_params(self.seq + 1, request, now)  # raises ValidationError for what JSON cannot hold
        self.seq = seq = self.seq + 1
        e = Entry(seq, rid, request.session_id, request.model, PRIORITIES[request.priority], now, request)
        ticket = Ticket(rid)
        e.tickets = [ticket]
        self.entries[rid] = e
        self.sched.add(e)  # its place in the session is fixed now, in submission order
        try:
            stored = await self.store.accept(rid, params)
        except BaseException as exc:
            self._forget(e)
            for t in e.tickets[1:]:
                t.set_exception(exc)
            raise
        if stored is not None:
            try:
                await self._check_same(request, params.hash, stored)
            except BaseException as exc:  # another request under this id: refused; the stored one stays as it is
                self._forget(e)
                for t in e.tickets[1:]:
                    t.set_exception(exc)
                self._pump()
                raise
            if stored.final:  # idempotency: never run again
                self._forget(e)
                for t in e.tickets:
                    t.set_result(stored.result)
                self._pump()
                return ticket
            e.seq = stored.seq  # stored unfinished by a process that did not serve: run it here
            self.seq = max(self.seq, stored.seq)
        self.sched.queued(e)
        if e.cancel_requested:
            self._cancel_entry(e, "cancelled before it ran")
        else:
            self._pump()
        if e.state == QUEUED and len(self.entries) > HELD_IN_MEMORY and not self.sched.is_head(e):
            e.request = None  # a deep queue: this one waits behind its session's head; its row holds it
        return ticket

    def _attach(self, e: Entry) -> Ticket:
        """Another ticket for the run of ``e``."""
        t = Ticket(e.request_id)
        if e.error is not None:
            t.set_exception(e.error)
        elif e.tickets is None:
            e.tickets = [t]
        else:
            e.tickets.append(t)
        return t

    def _forget(self, e: Entry) -> None:
        """Drop ``e`` (still ACCEPTING) from memory."""
        if self.entries.get(e.request_id) is e:
            del self.entries[e.request_id]
        self.sched.done(e)

    async def _enqueue_unserved(self, request: CompletionRequest) -> Ticket:
        """``serve=False``: store the request for the next serving process; its ticket completes only there."""
        params = request_params(None, request, time.time())
        while True:
            row = await self._owner_row()
            if self._serves(row):
                raise ServedElsewhere(f"the queue in {self.host.db.path} is served by process {row['pid']}: "
                                      "submit requests through it")
            stored = await self.store.accept_unserved(params, _owner_key(row))
            if stored is not False:  # else a process started serving since the owner row was read: look again
                break
        if stored is not None:
            await self._check_same(request, params.hash, stored)
            if stored.final:
                return Ticket.done(stored.result)
        ticket = Ticket(request.request_id)
        self._unserved_tickets.append(ticket)
        return ticket

    async def _check_same(self, request: CompletionRequest, new_hash: str, stored: Stored) -> None:
        """Raise ValidationError if the request stored under ``request``'s id asks something else
        (rows stored before migration 3 have no hash: accepted)."""
        if stored.request_hash is None or stored.request_hash == new_hash:
            return
        _check_same_request(await self.store.load(stored.seq), request)

    # -- running -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start whatever the schedule allows now: hand it to idle workers, start workers if too few."""
        if not self.serving:
            return
        if self.draining:  # nothing starts; tell ksi_drain when the last running request is stored
            if self._drained is not None and not self._drained.done() and not self._busy():
                self._drained.set_result(None)
            return
        started = self.sched.take()
        if not started:
            return
        now = time.time()
        mark = self.store.mark_running
        for e in started:
            mark(e.seq, now)
        self._startable.extend(started)
        idle = self._idle
        woken = 0
        while idle and woken < len(started):
            waiter = idle.popleft()
            if not waiter.done():  # (a worker cancelled while idle leaves a cancelled future)
                waiter.set_result(None)
                woken += 1
        # one worker per running request at most: a worker either runs one or is about to take one
        for _ in range(self.sched.in_flight - len(self._workers)):
            task = asyncio.ensure_future(self._worker())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _worker(self) -> None:
        """Run started entries one after the other; wait (idle) when there is none."""
        startable = self._startable
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            if not startable:
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            e = startable.popleft()
            if e.state != RUNNING:
                continue  # cancelled before a worker took it: its cancelled result is being stored
            e.task = me
            await self._run(e)
            e.task = None
            if me is not None and me.cancelling() and not self.closing:
                me.uncancel()  # the cancel was for that request (ksi_cancel), not for this worker

    async def _run(self, e: Entry) -> None:
        """Run ``e``; store its result. One cancelled meanwhile (``e`` no longer RUNNING) gets its cancelled
        result here, with the attempts made (``host.execute`` appends each to ``attempts`` as it ends)."""
        attempts: list[Attempt] = []
        try:
            request = e.request
            if request is None:  # restored: its messages are still in the database
                request = e.request = await self.store.load(e.seq)
            try:
                result = await self.host.execute(request, submitted_at=e.created_at, attempts=attempts)
            finally:
                self._reported.discard(e.request_id)
        except asyncio.CancelledError as exc:
            if e.state != RUNNING:
                self._cancelled(e, "cancelled while running", attempts)
                return
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # shutdown: the request stays stored unfinished
            # raised by a plugin or provider although nobody cancelled this run: a programming error
            error = RuntimeError(f"request {e.request_id}: host.execute raised CancelledError without being cancelled")
            error.__cause__ = exc
            self._crashed(e, error)
            return
        except DatabaseError as exc:  # a table (the ledger's, ...) could not be written: no result is stored either; the
            # request stays stored unfinished (it runs again at the next start) and its tickets get the error
            if e.state == RUNNING:
                self._crashed(e, exc, "stopped: the database failed")
            else:  # cancelled meanwhile: the cancel stands
                self._cancelled(e, "cancelled while running", attempts)
            return
        except OperationalError as err:  # host.execute turns these into results (a stored request that no longer
            # validates fails here, before any request exists to show the observers)
            result = CompletionResult.failed(e.request_id, err, model=e.model, session_id=e.session_id,
                                             submitted_at=e.created_at)
        except Exception as exc:
            if e.state == RUNNING:
                self._crashed(e, exc)
            else:  # raised while being cancelled: the cancel stands; report, do not lose it
                asyncio.get_running_loop().call_exception_handler({
                    "message": f"ksi-queue: cancelled request {e.request_id} raised while stopping", "exception": exc})
                self._cancelled(e, "cancelled while running", attempts)
            return
        if e.state != RUNNING:  # cancelled, but host.execute returned (the cancel came too late for it)
            self._cancelled(e, "cancelled while running", attempts)
            return
        self.sched.executed(e)
        self.store.save_result(e, result)
        self._pump()

    def _crashed(self, e: Entry, exc: BaseException, what: str = "stopped with a programming error") -> None:
        """A programming error (or a database failure) ended the run of ``e``: its tickets get the
        exception; the request stays stored unfinished (it runs again at the next start)."""
        if e.state == RUNNING:
            self.sched.executed(e)
        self.sched.done(e)
        e.error = exc
        self._deliver_error(e, exc, what)
        self._pump()

    def _deliver_error(self, e: Entry, exc: BaseException, what: str) -> None:
        tickets = e.tickets
        if tickets:
            for t in tickets:
                t.set_exception(exc)
        else:  # nobody waits for this (restored) request: do not lose the error
            asyncio.get_running_loop().call_exception_handler({
                "message": f"ksi-queue: request {e.request_id} {what}; it stays stored unfinished and runs again at the next start",
                "exception": exc,
            })

    def _saved(self, items: list[tuple[Entry, CompletionResult]]) -> None:
        """Results are committed: complete tickets, let sessions move on."""
        entries = self.entries
        done = self.sched.done
        for e, result in items:
            done(e)
            rid = e.request_id
            if entries.get(rid) is e:
                del entries[rid]
            if e.tickets:
                for t in e.tickets:
                    t.set_result(result)
            e.request = e.task = None
        self._pump()

    def _save_failed(self, items: list[tuple[Entry, CompletionResult]], exc: BaseException) -> None:
        for e, _ in items:
            self.sched.done(e)
            e.error = exc
            self._deliver_error(e, exc, "could not be stored")
        self._pump()

    # -- cancelling ----------------------------------------------------------------------

    def _cancel_entry(self, e: Entry, message: str) -> Ticket:
        """Cancel QUEUED or RUNNING ``e``: its cancelled result is made (here, or by ``_run`` once its
        ``host.execute`` has stopped), the observers see it, then it is stored; the ticket completes once it
        is stored."""
        running = e.state == RUNNING and e.task is not None
        if e.state == RUNNING:
            self.sched.executed(e)
            if e.task is not None:
                e.task.cancel()
        else:
            e.state = STORING  # left in the heaps; skipped when popped
        if e.error is not None:  # crashed before: the stored row is still unfinished
            e.error = None
            e.tickets = None
        ticket = self._attach(e)
        if not running:
            self._cancelled(e, message)
        self._pump()
        return ticket

    def _cancelled(self, e: Entry, message: str, attempts: list[Attempt] | None = None) -> None:
        """Make the cancelled result of ``e``, with the ``attempts`` made (the provider is the last one's),
        and report and store it in the background."""
        result = CompletionResult.failed(e.request_id, Cancelled(message), model=e.model, session_id=e.session_id,
                                         submitted_at=e.created_at, attempts=tuple(attempts or ()),
                                         provider=attempts[-1].provider if attempts else None)
        task = asyncio.ensure_future(self._report_and_store(e, e.request, result))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_and_store(self, e: Entry, request: CompletionRequest | None, result: CompletionResult) -> None:
        """Tell the ``ksi_request_finished`` observers about a result the queue made (a cancel), loading the
        request when only its row is in memory; then store the result. A programming error of an observer (or a
        database failure) goes to the tickets as for ``host.execute``, and the row stays unfinished."""
        try:
            if request is None:
                request = await self._stored_request(e.seq, e.request_id)
            if request is not None:
                await self.host.request_finished(request, result)
        except DatabaseError as exc:
            self._crashed(e, exc, "stopped: the database failed")
            return
        except Exception as exc:
            self._crashed(e, exc)
            return
        self.store.save_result(e, result)

    async def _report_stored(self, request_ids: list[str]) -> None:
        """Tell the observers about the cancelled results just stored in rows no process runs (an offline cancel)."""
        found = await self.store.fetch_stored(request_ids)
        stored = [found[rid] for rid in request_ids if rid in found and found[rid].final]
        requests = await asyncio.gather(*(self._stored_request(s.seq, s.result.request_id) for s in stored))
        for s, request in zip(stored, requests, strict=True):
            if request is not None:
                await self.host.request_finished(request, s.result)

    async def _stored_request(self, seq: int, request_id: str) -> CompletionRequest | None:
        """The request stored in row ``seq``, to show the observers; None when it no longer validates (stored by
        an older version): its cancel is stored all the same, and logged."""
        try:
            return await self.store.load(seq)
        except ValidationError as err:
            log.warning("ksi-queue: request %s is cancelled without telling the observers: its stored request is not "
                        "valid (%s)", request_id, err)
            return None

    @ksi_host.hookimpl(tryfirst=True)
    def ksi_request_finished(self, request: CompletionRequest) -> None:
        """Note that ``host.execute`` told the observers its result (first, before any observer may wait): a
        cancel arriving while they look at it is too late, so they never see two results of one request."""
        e = self.entries.get(request.request_id)
        if e is not None and e.state == RUNNING:
            self._reported.add(e.request_id)  # (until its host.execute returns; a set, not an Entry slot: 1.6 MB
            # less for 100,000 queued requests, as pymalloc rounds an Entry of 13 slots up to 128 bytes)

    async def _cancel_local(self, request_id: str) -> bool | None:
        e = self.entries.get(request_id)
        if e is None:
            outcome = await self._cancel_row(request_id, self._owner)
            return False if outcome is _OWNER_CHANGED else outcome  # (we own it: the row became final meanwhile)
        if e.error is not None:
            e.state = QUEUED
        if e.state == ACCEPTING:
            e.cancel_requested = True
            result = await self._attach(e).result()
            return result.status == "cancelled"
        if e.state == QUEUED:
            await self._cancel_entry(e, "cancelled before it ran").result()
            return True
        if e.state == RUNNING and request_id not in self._reported:
            await self._cancel_entry(e, "cancelled while running").result()
            return True
        return False  # its final result is decided (being reported or stored)

    async def _clear_local(self, session_id: str) -> int:
        tickets = []
        for e in self.sched.session_entries(session_id):
            if e.state == QUEUED:
                tickets.append(self._cancel_entry(e, f"cancelled: session {session_id} was cleared"))
            elif e.state == ACCEPTING:
                e.cancel_requested = True
                tickets.append(self._attach(e))
        n = 0
        problem = None
        for outcome in await asyncio.gather(*(t.result() for t in tickets), return_exceptions=True):
            if isinstance(outcome, CompletionResult):
                n += outcome.status == "cancelled"
            elif problem is None:
                problem = outcome
        if problem is not None:
            raise problem
        return n

    @ksi_host.hookimpl
    async def ksi_cancel(self, host: Any, request_id: str) -> bool | None:
        if self.serving:
            return await self._cancel_local(request_id)
        while True:
            row = await self._owner_row()
            if self._serves(row):
                outcome = await self._send_command("cancel", request_id, row)
                return None if outcome is None else bool(outcome)
            outcome = await self._cancel_row(request_id, _owner_key(row))
            if outcome is not _OWNER_CHANGED:
                return outcome

    async def _cancel_row(self, request_id: str, owner: tuple[Any, Any] | None) -> Any:
        """Cancel a request known only by its row (not in this process's memory), if the owner row is
        still ``owner``: None if unknown, False if final, True once its cancelled result is stored,
        ``_OWNER_CHANGED`` if another process started serving since (nothing changed: ask it)."""
        stored = await self.store.lookup(request_id)
        if stored is None:
            return None
        if stored.final:
            return False
        if await self.store.cancel_stored(request_id, "cancelled before it ran", owner or (None, None)):
            await self._report_stored([request_id])
            return True
        return _OWNER_CHANGED  # (or the row became final meanwhile: the caller looks again and finds out)

    @ksi_host.hookimpl
    async def ksi_clear_session(self, host: Any, session_id: str) -> int:
        if self.serving:
            return await self._clear_local(session_id)
        while True:
            row = await self._owner_row()
            if self._serves(row):
                return int(await self._send_command("clear_session", session_id, row) or 0)
            owner = _owner_key(row)
            cleared = await self.store.clear_stored(session_id, f"cancelled: session {session_id} was cleared", owner)
            if cleared:
                await self._report_stored(cleared)
            if cleared or _owner_key(await self._owner_row()) == owner:
                return len(cleared)

    # -- other processes ---------------------------------------------------------------------

    async def _owner_row(self) -> Any:
        """The row of ``ksi_queue_owner`` (the process that serves or served this database), or None."""
        return await self.host.db.fetchone(schema.SELECT_OWNER)

    def _serves(self, row: Any) -> bool:
        """Does the owner ``row`` name a process (or another Host of this one) that serves the database now?"""
        if row is None:
            return False
        if row["pid"] == os.getpid():
            key = _db_key(self.host.db.path)
            other = _SERVING.get(key) if key is not None else None
            return other is not None and other is not self
        return alive(row["pid"], row["process_start"])

    async def _live_owner(self) -> Any:
        """The owner row of a process (or another Host of this one) serving this database, or None."""
        row = await self._owner_row()
        return row if self._serves(row) else None

    async def _send_command(self, kind: str, target: str, owner: Any) -> int | None:
        """Ask the serving process to cancel / clear; wait for its answer."""
        db = self.host.db
        command_id = uuid.uuid4().hex
        await db.execute(schema.INSERT_COMMAND, (command_id, kind, target, time.time()))
        deadline = time.monotonic() + COMMAND_WAIT_S
        while True:
            row = await db.fetchone(schema.SELECT_COMMAND, (command_id,))
            if row is not None and row["handled_at"] is not None:
                return row["outcome"]
            if time.monotonic() > deadline:
                await db.execute(schema.ANSWER_COMMAND + " AND handled_at IS NULL", (time.time(), None, command_id))
                raise ServedElsewhere(
                    f"the process serving the queue (pid {owner['pid']}) did not answer the {kind} command "
                    f"within {COMMAND_WAIT_S:g} s; nothing was changed"
                )
            await asyncio.sleep(COMMAND_POLL_S / 4)

    async def _command_loop(self) -> None:
        """Serve cancel / clear-session commands written by other processes (``ksi-host cancel``)."""
        db = self.host.db
        while True:
            await asyncio.sleep(COMMAND_POLL_S)
            for command_id, kind, target in await db.fetchall(schema.SELECT_OPEN_COMMANDS):
                outcome = None
                try:
                    if kind == "cancel":
                        found = await self._cancel_local(target)
                        outcome = None if found is None else int(found)
                    else:
                        outcome = await self._clear_local(target)
                except Exception as exc:  # reported, and the channel keeps serving
                    asyncio.get_running_loop().call_exception_handler({
                        "message": f"ksi-queue: the {kind} command for {target!r} failed", "exception": exc})
                await db.execute(schema.ANSWER_COMMAND + " AND handled_at IS NULL", (time.time(), outcome, command_id))

    # -- status -------------------------------------------------------------------------------

    @ksi_host.hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any]:
        per: dict[str | None, list[Any]] = {}
        if self.serving:
            for e in self.entries.values():
                state = e.state
                if state == DONE:
                    continue
                rec = per.get(e.session_id)
                if rec is None:
                    rec = per[e.session_id] = [0, 0, None]
                if state >= RUNNING:
                    rec[1] += 1
                else:
                    rec[0] += 1
                    if rec[2] is None or e.created_at < rec[2]:
                        rec[2] = e.created_at
            served_by = os.getpid()
        else:
            for sid, queued, running, oldest in await host.db.fetchall(schema.SELECT_STATUS):
                per[sid] = [queued or 0, running or 0, oldest]
            owner = await self._live_owner()
            served_by = owner["pid"] if owner is not None else None
        if self.serving:
            in_flight = self.sched.in_flight
        elif served_by is not None:  # the rows marked running (a request gets its mark MARK_DELAY_S after it started)
            in_flight = sum(r[1] for r in per.values())
        else:  # rows left running by a process that is gone run again at the next start: nothing is in flight
            in_flight = 0
        now = time.time()

        def wait(created: float | None) -> float | None:
            return None if created is None else round(max(0.0, now - created), 3)

        oldest = min((r[2] for r in per.values() if r[2] is not None), default=None)
        return {"queue": {
            "queued": sum(r[0] for r in per.values()),
            "running": sum(r[1] for r in per.values()),
            "sessions": sum(1 for sid in per if sid is not None),
            "oldest_wait_s": wait(oldest),
            "concurrency": self.sched.limit,
            "in_flight": in_flight,
            "served_by_pid": served_by,
            "model_limits": dict(self.sched.model_limits),
            "by_session": [
                {"session_id": sid, "queued": r[0], "running": r[1], "oldest_wait_s": wait(r[2])}
                for sid, r in sorted(per.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))
            ],
        }}

    # -- what it shows of its requests (ksi-host show, ksi-host logs) ---------------------------

    def _running_here(self) -> dict[str, Entry]:
        """The requests this process runs now (their rows say ``queued`` until their running mark is written),
        and those whose result is on its way to the table."""
        if not self.serving:
            return {}
        return {rid: e for rid, e in self.entries.items() if e.state in (RUNNING, STORING)}

    @ksi_host.hookimpl
    async def ksi_request_details(self, host: Any, request_id: str) -> dict[str, Any] | None:
        found = await listing.details(host.db, request_id)
        if found is None:
            return None
        row, result = found
        e = self.entries.get(request_id) if self.serving else None
        running = result is None and e is not None and e.state in (RUNNING, STORING)  # (its row may say queued yet)
        return listing.details_sections(row, result, "running" if running else row["status"])

    @ksi_host.hookimpl
    async def ksi_list_requests(self, host: Any, query: RequestQuery) -> list[dict[str, Any]]:
        db = host.db
        running = self._running_here()
        if query.status == "running" and self.serving:  # what this process runs, whatever its rows say yet
            rows = await listing.page(db, query, status=None, ids=list(running)) if running else []
            rows = [r for r in rows if r["status"] not in schema.FINAL]  # (stored this very moment)
        elif query.status == "queued" and self.serving:  # rows that say queued, but for those running here
            rows = await listing.page(db, query, status="queued", limit=query.limit + len(running))
            rows = [r for r in rows if r["request_id"] not in running][:query.limit]
        else:
            rows = await listing.page(db, query, status=query.status)
        return [listing.listed(r, "running" if r["request_id"] in running and r["status"] not in schema.FINAL
                               else r["status"]) for r in rows]
