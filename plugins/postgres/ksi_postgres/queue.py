"""The shared queue: accepting, claiming with leases, running, storing, cancelling.

Every host (a serving process) runs the same loops:

* **accept**: the requests submitted during one turn of the event loop are inserted in one transaction
  (``schema.ACCEPT``); ids stored before are looked up in it too. Returns once committed.
* **claim**: while this host has room, it takes the next runnable requests (``schema.CLAIM``: ``FOR UPDATE
  SKIP LOCKED`` over queued rows whose session has nothing earlier unfinished, best priority then oldest)
  with a lease: ``lease_owner`` = this host, a new ``lease_epoch``, ``lease_expires_at``. It claims when
  told of new work (NOTIFY ``ksi_pg_work`` on every insert, a result it stored) and every ``poll_s``,
  when it also takes over leases that ran out (``schema.TAKE_OVER``).
* **run**: each claimed request runs in its own task (``host.execute``); its final result is stored by
  ``schema.STORE_RESULTS`` in the transaction that ends the lease, only if this host still holds it under
  the same epoch. Results that finish together share one statement.
* **heartbeat** every third of ``lease_s``: one statement renews the leases of the requests running here
  and the host's heartbeat; a request missing from its answer was taken over (this host was too slow to
  renew): its task is stopped, and its result will come from the new holder. It also settles the calls of
  hosts whose heartbeat stopped (their ``sent`` rows become ``unknown``).

Tickets wait on this host for requests any host may run: the host that stores a result NOTIFYs the
hosts waiting for it (``ksi_pg_host_<id>``: ``done <seqs>``); with every heartbeat a host also reads the
results of its waiting requests that became final (a notification lost with a broken connection).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

from ksi_host.errors import Cancelled, DatabaseError, OperationalError, ValidationError
from ksi_host.models import Attempt, CompletionRequest, CompletionResult, Ticket

from . import rows, schema
from .db import Batcher, Pg, columns

log = logging.getLogger("ksi_host.postgres")

CANCEL_WAIT_S = 10.0
"""How long a cancel of a request running on another host waits for that host's answer."""


class CancelNotAnswered(OperationalError):
    """The host running a request did not answer a cancel in time (the request stays marked to be cancelled)."""


class Entry:
    """A request whose tickets wait in this process."""

    __slots__ = ("seq", "request_id", "request", "tickets")

    def __init__(self, request_id: str, request: CompletionRequest | None) -> None:
        self.seq: int | None = None
        self.request_id = request_id
        self.request = request
        self.tickets: list[Ticket] = []

    def ticket(self) -> Ticket:
        t = Ticket(self.request_id)
        self.tickets.append(t)
        return t


class Run:
    """A request this host holds a lease on and runs."""

    __slots__ = ("seq", "epoch", "request", "created_at", "task", "stop_reason", "storing")

    def __init__(self, seq: int, epoch: int, request: CompletionRequest, created_at: float) -> None:
        self.seq = seq
        self.epoch = epoch
        self.request = request
        self.created_at = created_at
        self.task: asyncio.Task[None] | None = None
        self.stop_reason: str | None = None  # "cancel" (store a cancelled result), "lost" (lease gone), "stop"
        self.storing = False


class Stored:
    """A row found under a request id: its seq, status, request hash and result when final."""

    __slots__ = ("seq", "status", "request_hash", "result")

    def __init__(self, seq: int, status: str, request_hash: str, result: CompletionResult | None) -> None:
        self.seq, self.status, self.request_hash, self.result = seq, status, request_hash, result


class PgQueue:
    """The queue of one host (``serve``) or of a process that only submits, cancels and reads."""

    def __init__(self, host: Any, pg: Pg, *, serve: bool, limit: int, lease_s: float, poll_s: float,
                 model_limits: dict[str, int], stop_grace_s: float = 0.0) -> None:
        self.host = host
        self.pg = pg
        self.serve = serve
        self.limit = limit
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.model_limits = dict(model_limits)
        self.stop_grace_s = stop_grace_s
        self.host_id: str | None = uuid.uuid4().hex if serve else None
        self.entries: dict[str, Entry] = {}  # request id -> entry (tickets waiting here)
        self.by_seq: dict[int, Entry] = {}
        self.running: dict[int, Run] = {}
        self.accepts = Batcher(self._accept_batch)
        self.stores = Batcher(self._store_batch)
        self.serving = False
        self.draining = False
        self.closing = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: Any = None
        self._done_seqs: set[int] = set()
        self._done_task: asyncio.Task[None] | None = None
        self._unserved: list[Ticket] = []
        self.claims = 0
        self.claimed = 0

    @property
    def channel(self) -> str:
        return f"{schema.HOST_CHANNEL_PREFIX}{self.host_id}"

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.serve:
            return
        await self.pg.run(lambda con: con.fetchval(schema.REGISTER_HOST, self.host_id, socket.gethostname(), os.getpid(),
                                                   self.lease_s, self.limit), starting=True)
        await self._listen(starting=True)
        await self.pg.run(lambda con: con.execute(schema.SETTLE_LOST_CALLS, self.host_id), starting=True)
        self.serving = True
        self._tasks = [asyncio.ensure_future(self._claim_loop()), asyncio.ensure_future(self._heartbeat_loop())]

    async def _listen(self, starting: bool = False) -> None:
        import asyncpg

        try:
            con = await asyncpg.connect(self.pg.dsn, timeout=30)
            await con.add_listener(schema.WORK_CHANNEL, self._on_work)
            await con.add_listener(self.channel, self._on_message)
        except Exception as e:
            raise self.pg.error(e, starting) from None
        self._listener = con

    def _on_work(self, *args: Any) -> None:
        self._wake.set()

    def _on_message(self, con: Any, pid: int, channel: str, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        if kind == "done":
            self._done_seqs.update(int(s) for s in rest.split(",") if s)
            if self._done_task is None:
                self._done_task = asyncio.ensure_future(self._deliver_done())
        elif kind == "cancel":
            run = self.running.get(int(rest))
            if run is not None:
                self._stop_run(run, "cancel")

    async def drain(self) -> None:
        """Claim nothing more; return once every request running here has its result stored."""
        self.draining = True
        while self.running:
            await asyncio.gather(*[r.task for r in list(self.running.values()) if r.task is not None],
                                 return_exceptions=True)
        await self.stores.drain()

    async def stop(self) -> None:
        """Stop claiming; let the running requests finish for up to ``stop_grace_s`` (their calls are sent: cutting
        them short would send them again elsewhere), then stop the rest and give their leases back (any host takes
        them now)."""
        self.closing = True
        self.serving = False
        claim_loop, *others = self._tasks or [None]
        for task in others:
            task.cancel()
        if claim_loop is not None:  # not cancelled: a claim cut off mid-statement may commit leases nobody here knows
            self._wake.set()
            await asyncio.gather(claim_loop, return_exceptions=True)
        await asyncio.gather(*others, return_exceptions=True)
        if self.running and self.stop_grace_s > 0:  # finish what runs here (other hosts' requests too) if it ends soon
            await asyncio.wait([r.task for r in self.running.values() if r.task is not None], timeout=self.stop_grace_s)
        runs = list(self.running.values())
        for run in runs:
            self._stop_run(run, "stop")
        problems = [o for o in await asyncio.gather(*[r.task for r in runs if r.task is not None], return_exceptions=True)
                    if isinstance(o, Exception)]
        await self.accepts.drain()
        await self.stores.drain()
        if self.host_id is not None:
            try:  # every lease this host still holds (a claim whose answer never arrived too), for any host to take
                await self.pg.execute(schema.RELEASE_ALL, self.host_id)
            except DatabaseError as e:  # their leases run out instead: another host takes them after lease_s
                log.warning("ksi-postgres: could not give back the leases of this host: %s", e.message)
            self.running.clear()
        stopped = Cancelled("the host stopped before this request finished; it stays stored and another host "
                            "(or the next start) runs it")
        for e in list(self.entries.values()):
            for t in e.tickets:
                if not t.is_done():
                    t.set_exception(stopped)
                    t.future.exception()
        for t in self._unserved:
            if not t.is_done():
                t.set_exception(stopped)
                t.future.exception()
        if self._done_task is not None:
            self._done_task.cancel()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), 5)
            except Exception:
                listener.terminate()
        if problems:
            raise problems[0]

    async def mark_stopped(self) -> None:
        if self.host_id is not None:
            try:
                await self.pg.execute(schema.STOP_HOST, self.host_id)
            except DatabaseError as e:
                log.warning("ksi-postgres: could not mark this host stopped: %s", e.message)

    # -- accepting -----------------------------------------------------------------------------

    async def enqueue(self, request: CompletionRequest) -> Ticket:
        rid = request.request_id
        e = self.entries.get(rid)
        if e is not None:  # waiting here already: the same run, if it is the same request
            if e.request is not None and e.request is not request:
                self._check_same(e.request, request)
            return e.ticket()
        if self.closing:
            raise Cancelled(f"the queue is shutting down; request {rid} was not accepted")
        row, payload = rows.accept_row(request)  # raises ValidationError for what JSON cannot hold
        e = Entry(rid, request)
        ticket = e.ticket()
        if self.serve:
            self.entries[rid] = e
        try:
            answer = await self.accepts.add((row, payload))
        except BaseException:
            self._forget(e)
            raise
        if isinstance(answer, tuple):  # (seq, created_at): stored now
            e.seq = answer[0]
            if self.serve:
                self.by_seq[e.seq] = e
                self._wake.set()
            else:
                self._unserved.append(ticket)
            return ticket
        stored: Stored = answer
        try:
            if stored.request_hash != row[-1]:
                self._check_same(await self.load_request(stored.seq), request)
        except BaseException:
            self._forget(e)
            raise
        if stored.result is not None:  # final: never run again
            self._forget(e)
            for t in e.tickets:
                t.set_result(stored.result)
            return ticket
        e.seq = stored.seq
        if self.serve:
            self.by_seq[e.seq] = e  # the holder tells this host (a waiter row was added) when it is final
        else:
            self._unserved.append(ticket)
        return ticket

    @staticmethod
    def _check_same(stored: CompletionRequest, request: CompletionRequest) -> None:
        differ = rows.differences(stored, request)
        if differ:
            raise ValidationError("request_id", f"{request.request_id!r} is already stored with a different request "
                                  f"(differs in {', '.join(differ)}): a request id names one request; give this one its "
                                  "own request_id")

    def _forget(self, e: Entry) -> None:
        if self.entries.get(e.request_id) is e:
            del self.entries[e.request_id]
        if e.seq is not None and self.by_seq.get(e.seq) is e:
            del self.by_seq[e.seq]

    async def _accept_batch(self, items: list[tuple[tuple[Any, ...], list[Any]]]) -> list[Any]:
        reqs = [row for row, _ in items]
        first = {row[0]: payload for row, payload in reversed(items)}  # (an id twice in one batch: one payload)
        args = [*columns(reqs, len(schema.ACCEPT_TYPES)), *columns(list(first.values()), len(schema.PAYLOAD_COLUMNS)),
                self.host_id, list(first)]

        new = {r["request_id"]: (r["seq"], r["created_at"]) for r in await self.pg.fetch(schema.ACCEPT_CALL, *args)}
        if len(new) == len(items):
            return [new[row[0]] for row in reqs]

        async def look_up(con: Any) -> dict[str, Stored]:  # ids stored before (another host, an earlier run)
            old = await self._stored(con, [row[0] for row in reqs if row[0] not in new])
            unfinished = [s.seq for s in old.values() if s.result is None]
            if unfinished and self.host_id is not None:
                await con.execute(schema.ADD_WAITERS, unfinished, self.host_id)
            return old

        old = await self.pg.transaction(look_up)
        return [new.get(row[0]) or old[row[0]] for row in reqs]

    async def _stored(self, con: Any, ids: list[str]) -> dict[str, Stored]:
        found = await con.fetch(schema.SELECT_BY_IDS, ids)
        finals = [r["seq"] for r in found if r["status"] in schema.FINAL]
        attempts: dict[int, list[Any]] = {}
        if finals:
            for a in await con.fetch(schema.SELECT_ATTEMPTS, finals):
                attempts.setdefault(a["seq"], []).append(rows.attempt_from_row(a))
        return {r["request_id"]: Stored(r["seq"], r["status"], r["request_hash"],
                                        rows.result_from_row(r, attempts.get(r["seq"], ()))
                                        if r["status"] in schema.FINAL else None) for r in found}

    async def results(self, seqs: list[int]) -> dict[int, CompletionResult]:
        """The final results of the rows ``seqs`` (those that are final)."""
        async def read(con: Any) -> dict[int, CompletionResult]:
            found = await con.fetch(schema.SELECT_FINAL_BY_SEQS, seqs)
            if not found:
                return {}
            attempts: dict[int, list[Any]] = {}
            for a in await con.fetch(schema.SELECT_ATTEMPTS, [r["seq"] for r in found]):
                attempts.setdefault(a["seq"], []).append(rows.attempt_from_row(a))
            return {r["seq"]: rows.result_from_row(r, attempts.get(r["seq"], ())) for r in found}
        return await self.pg.run(read)

    async def load_request(self, seq: int) -> CompletionRequest:
        row = await self.pg.fetchrow(schema.SELECT_REQUESTS, [seq])
        return rows.request_from_row(row)

    # -- results of requests other hosts ran ---------------------------------------------------------

    async def _deliver_done(self) -> None:
        try:
            while self._done_seqs:
                seqs, self._done_seqs = [s for s in self._done_seqs if s in self.by_seq], set()
                if seqs:
                    self._complete(await self.results(seqs))
        except DatabaseError as e:  # the poll reads them again
            log.warning("ksi-postgres: could not read finished results: %s", e.message)
        finally:
            self._done_task = None

    def _complete(self, results: dict[int, CompletionResult]) -> None:
        for seq, result in results.items():
            e = self.by_seq.get(seq)
            if e is None:
                continue
            self._forget(e)
            for t in e.tickets:
                t.set_result(result)

    async def _check_waiting(self) -> None:
        """Read the results of waiting requests that became final elsewhere (a missed notification)."""
        seqs = [s for s in self.by_seq if s not in self.running]
        if seqs:
            self._complete(await self.results(seqs))

    # -- claiming and running -------------------------------------------------------------------------

    def _full_models(self) -> list[str]:
        if not self.model_limits:
            return []
        counts: dict[str, int] = {}
        for run in self.running.values():
            counts[run.request.model] = counts.get(run.request.model, 0) + 1
        return [m for m, lim in self.model_limits.items() if counts.get(m, 0) >= lim]

    async def _claim(self, sql: str, room: int) -> int:
        found = await self.pg.fetch(sql, self.host_id, room, self._full_models(), self.lease_s)
        self.claims += 1
        self.claimed += len(found)
        over: list[Any] = []
        counts: dict[str, int] = {}
        for run in self.running.values():
            counts[run.request.model] = counts.get(run.request.model, 0) + 1
        for r in found:
            lim = self.model_limits.get(r["model"])
            if lim is not None and counts.get(r["model"], 0) >= lim:
                over.append(r)  # more of a limited model than may run here: given back below
                continue
            counts[r["model"]] = counts.get(r["model"], 0) + 1
            e = self.by_seq.get(r["seq"])
            request = e.request if e is not None and e.request is not None else rows.request_from_row(r)
            run = Run(r["seq"], r["lease_epoch"], request, r["created_at"])
            self.running[run.seq] = run
            if r["cancel_requested"]:
                run.stop_reason = "cancel"
                self._start(run, self._cancelled_before_start(run))
            else:
                self._start(run, self._run(run))
        if over:
            await self.pg.execute(schema.RELEASE, self.host_id, [r["seq"] for r in over], [r["lease_epoch"] for r in over])
        return len(found)

    async def _claim_loop(self) -> None:
        last_poll = 0.0
        while self.serving:
            self._wake.clear()
            try:
                polling = time.monotonic() - last_poll >= self.poll_s
                room = self.limit - len(self.running)
                if polling:
                    last_poll = time.monotonic()
                    if room > 0 and not self.draining:
                        room -= await self._claim(schema.TAKE_OVER, room)
                if room > 0 and not self.draining and await self._claim(schema.CLAIM, room) == room:
                    continue  # there may be more
            except DatabaseError as e:
                log.warning("ksi-postgres: claiming failed (trying again in %.1f s): %s", self.poll_s, e.message)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    def _start(self, run: Run, work: Any) -> None:
        run.task = asyncio.ensure_future(work)
        run.task.add_done_callback(lambda task: self._run_done(run, task))

    def _run_done(self, run: Run, task: asyncio.Task[None]) -> None:
        """A run's task ended. One cancelled before it began (its coroutine never ran) is handled here."""
        if not task.cancelled() or run.storing or self.running.get(run.seq) is not run:
            return
        if run.stop_reason == "cancel":
            self._start(run, self._cancelled_before_start(run, "cancelled while running"))
        elif run.stop_reason == "lost":
            del self.running[run.seq]

    async def _run(self, run: Run) -> None:
        request = run.request
        attempts: list[Attempt] = []  # host.execute appends each attempt as it ends: what a cancelled result keeps
        try:
            result = await self.host.execute(request, submitted_at=run.created_at, attempts=attempts)
        except asyncio.CancelledError:
            if run.stop_reason == "lost":  # no result from here: the new holder runs it
                del self.running[run.seq]
                return
            if run.stop_reason != "cancel":  # stopping: the lease is given back, the next host runs it
                return
            result = await self.host.request_finished(request, CompletionResult.failed(
                request.request_id, Cancelled("cancelled while running"), model=request.model,
                session_id=request.session_id, submitted_at=run.created_at, attempts=tuple(attempts),
                provider=attempts[-1].provider if attempts else None))
        except BaseException as exc:  # a programming error: the tickets get it; the lease is not renewed
            self.running.pop(run.seq, None)
            e = self.by_seq.get(run.seq)
            if e is not None:
                self._forget(e)
                for t in e.tickets:
                    t.set_exception(exc)
            if e is None or not e.tickets:
                raise
            return
        await self._finish(run, result)

    async def _cancelled_before_start(self, run: Run, why: str = "cancelled before it ran") -> None:
        request = run.request
        result = await self.host.request_finished(request, CompletionResult.failed(
            request.request_id, Cancelled(why), model=request.model, session_id=request.session_id,
            submitted_at=run.created_at))
        await self._finish(run, result)

    async def _finish(self, run: Run, result: CompletionResult) -> None:
        run.storing = True
        try:
            written = await self.stores.add((run.seq, run.epoch, result, run.request.session_id))
        except DatabaseError as exc:  # the lease runs out and another host runs it again
            self.running.pop(run.seq, None)
            e = self.by_seq.get(run.seq)
            if e is not None:
                self._forget(e)
                for t in e.tickets:
                    t.set_exception(exc)
            self._wake.set()
            return
        self.running.pop(run.seq, None)
        self._wake.set()
        if not written:
            log.warning("ksi-postgres: the result of %s was not stored: this host lost its lease (another host runs it)",
                        run.request.request_id)
            return
        e = self.by_seq.get(run.seq)
        if e is not None:
            self._forget(e)
            for t in e.tickets:
                t.set_result(result)

    async def _store_batch(self, items: list[tuple[int, int, CompletionResult, str | None]]) -> list[bool]:
        stored = [rows.store_row(seq, epoch, r) for seq, epoch, r, _ in items]
        attempts = [a for seq, _, r, _ in items for a in rows.attempt_rows(seq, r)]
        sessions = list({sid for *_, sid in items if sid is not None})

        found = await self.pg.fetch(schema.STORE_CALL, self.host_id, *columns(stored, len(schema.STORE_TYPES)),
                                    *columns(attempts, len(schema.ATTEMPT_TYPES)), sessions)
        written = {r["seq"] for r in found}
        return [seq in written for seq, *_ in items]

    def _stop_run(self, run: Run, reason: str) -> None:
        if run.storing or run.task is None or run.task.done():
            return
        if run.stop_reason is None or reason == "stop":
            run.stop_reason = reason
        run.task.cancel()

    async def _heartbeat_loop(self) -> None:
        while self.serving:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.heartbeat()
            except DatabaseError as e:
                log.warning("ksi-postgres: heartbeat failed (leases run out after %.1f s without one): %s",
                            self.lease_s, e.message)

    async def heartbeat(self) -> None:
        """Renew this host's heartbeat and leases; stop the runs whose lease was taken over; act on cancels."""
        seqs = [s for s, r in self.running.items() if not r.storing]
        held = {r["seq"]: r for r in await self.pg.fetch(schema.RENEW, self.host_id, self.lease_s, len(self.running), seqs)}
        for seq in seqs:
            run = self.running.get(seq)
            if run is None or run.storing:
                continue
            row = held.get(seq)
            if row is None or row["lease_epoch"] != run.epoch:
                log.warning("ksi-postgres: lost the lease of %s (renewed too late); another host runs it",
                            run.request.request_id)
                self._stop_run(run, "lost")
            elif row["cancel_requested"]:
                self._stop_run(run, "cancel")
        await self.pg.execute(schema.SETTLE_LOST_CALLS, self.host_id)
        await self._check_waiting()
        if self._listener is not None and self._listener.is_closed():
            log.warning("ksi-postgres: the notification connection was lost; reconnecting")
            await self._listen()

    # -- cancelling --------------------------------------------------------------------------------------

    async def cancel(self, request_id: str) -> bool | None:
        for _ in range(5):
            gone = await self.pg.transaction(lambda con: self._cancel_queued(con, request_id))
            if gone:
                await self._cancelled_here([g["seq"] for g in gone])
                return True
            marked = await self.pg.fetchrow(schema.REQUEST_CANCEL, request_id)
            if marked is not None:
                return await self._cancel_running(request_id, marked)
            state = await self.pg.fetchrow(schema.SELECT_STATE, request_id)
            if state is None:
                return None
            if state["status"] in schema.FINAL:
                return False
        return False  # it kept moving between queued and running: let the caller try again

    @staticmethod
    async def _cancel_queued(con: Any, request_id: str) -> list[Any]:
        """Cancel the row of ``request_id`` if it is queued, under its session's lock; the next one becomes head."""
        sid = await con.fetchval(schema.SESSION_OF, request_id)
        if sid is not None:
            await con.fetchval(schema.LOCK_SESSIONS, [sid])
        gone = list(await con.fetch(schema.CANCEL_QUEUED, request_id, "cancelled before it ran"))
        if gone and sid is not None:
            await con.execute(schema.FIX_HEADS, [sid])
        return gone

    async def _cancel_running(self, request_id: str, marked: Any) -> bool:
        seq, owner = marked["seq"], marked["lease_owner"]
        run = self.running.get(seq)
        if owner == self.host_id and run is not None:
            self._stop_run(run, "cancel")
        else:
            await self.pg.execute("SELECT pg_notify($1, $2)", f"{schema.HOST_CHANNEL_PREFIX}{owner}", f"cancel {seq}")
        deadline = time.monotonic() + max(CANCEL_WAIT_S, self.lease_s + 2 * self.poll_s)
        while time.monotonic() < deadline:
            state = await self.pg.fetchrow(schema.SELECT_STATE, request_id)
            if state["status"] in schema.FINAL:
                e = self.by_seq.get(seq)
                if e is not None:
                    self._complete(await self.results([seq]))
                return bool(state["status"] == "cancelled")
            await asyncio.sleep(0.02)
        raise CancelNotAnswered(f"request {request_id} is marked to be cancelled, but the host running it did not "
                                f"stop it within {CANCEL_WAIT_S:g} s; it ends cancelled unless it finishes first")

    async def clear_session(self, session_id: str) -> int:
        async def clear(con: Any) -> list[Any]:
            await con.fetchval(schema.LOCK_SESSIONS, [session_id])
            found = await con.fetch(schema.CLEAR_QUEUED, session_id, "cancelled: its session was cleared")
            await con.execute(schema.FIX_HEADS, [session_id])
            return list(found)

        gone = await self.pg.transaction(clear)
        await self._cancelled_here([g["seq"] for g in gone])
        return len(gone)

    async def _cancelled_here(self, seqs: list[int]) -> None:
        """Results this process made in the database (cancels): complete the tickets waiting here, tell observers."""
        if not seqs:
            return
        results = await self.results(seqs)
        requests = {e.seq: e.request for e in (self.by_seq.get(s) for s in seqs) if e is not None and e.request is not None}
        missing = [s for s in seqs if s not in requests]
        if missing and self.host.hooks.implemented("ksi_request_finished"):
            for r in await self.pg.fetch(schema.SELECT_REQUESTS, missing):
                requests[r["seq"]] = rows.request_from_row(r)
        self._complete(results)
        for seq, result in results.items():
            if seq in requests:
                await self.host.request_finished(requests[seq], result)
