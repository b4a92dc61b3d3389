"""The in-memory schedule: which accepted request runs next. No I/O here.

Each request is an :class:`Entry`. A session's entries wait in a deque in
submission order; only the session's head (its oldest entry not yet final)
can be *ready*, and only once the entry before it is final (stored). Entries
without a session are ready as soon as they are queued. Ready entries wait in
one heap ordered by ``(priority rank, seq)``; :meth:`Scheduler.take` pops
them while the global limit (and the entry's per-model limit) allows; an
entry at or below ``hold_through`` (stored by an earlier run, on a host that
does not resume them) is dropped instead: it never starts, and its session
waits behind it. An
entry whose model is at its limit waits in that model's own heap until a
slot of the model frees. Cancelled entries are left in the heaps and skipped
when popped (lazy deletion), so every operation is O(log n).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from heapq import heapify, heappop, heappush
from typing import Any

# Entry states, in order.
ACCEPTING = 0  # registered by ksi_enqueue, not yet durable
QUEUED = 1  # stored, waiting
RUNNING = 2  # host.execute in progress; holds a slot
STORING = 3  # final result (or cancellation) decided, being stored; the session still waits
DONE = 4  # final and stored (or dropped); the session moves on

STATE_NAMES = ("accepting", "queued", "running", "storing", "done")


class Entry:
    """One request in the queue. Light on purpose: a restored entry keeps
    ``request`` None until it runs (its messages stay in the database)."""

    __slots__ = (
        "seq", "request_id", "session_id", "model", "rank", "created_at", "state",
        "request", "tickets", "task", "error", "cancel_requested",
    )

    def __init__(self, seq: int, request_id: str, session_id: str | None, model: str, rank: int,
                 created_at: float, request: Any = None, state: int = ACCEPTING) -> None:
        self.seq = seq
        self.request_id = request_id
        self.session_id = session_id
        self.model = model
        self.rank = rank
        self.created_at = created_at
        self.state = state
        self.request = request
        self.tickets: list[Any] | None = None
        self.task: Any = None
        self.error: BaseException | None = None  # a programming error that ended this run
        self.cancel_requested = False

    def __repr__(self) -> str:
        return f"<Entry {self.seq} {self.request_id} session={self.session_id} {STATE_NAMES[self.state]}>"


class Scheduler:
    """Sessions, the ready heap and the limits."""

    def __init__(self, limit: int, model_limits: Mapping[str, int] | None = None) -> None:
        self.limit = limit
        self.model_limits = dict(model_limits or {})
        self.in_flight = 0
        self.model_in_flight = dict.fromkeys(self.model_limits, 0)
        self.ready: list[tuple[int, int, Entry]] = []
        self.blocked: dict[str, list[tuple[int, int, Entry]]] = {m: [] for m in self.model_limits}
        self.sessions: dict[str, deque[Entry]] = {}
        self.hold_through = 0  # entries with seq <= this are held: never started (host.resume False)

    # -- entering -------------------------------------------------------------

    def add(self, e: Entry) -> None:
        """Register ``e`` (ACCEPTING) in submission order; :meth:`queued` makes it runnable."""
        sid = e.session_id
        if sid is not None:
            q = self.sessions.get(sid)
            if q is None:
                self.sessions[sid] = deque((e,))
            else:
                q.append(e)

    def queued(self, e: Entry) -> None:
        """``e`` (ACCEPTING) is now stored: it may become ready."""
        e.state = QUEUED
        sid = e.session_id
        if sid is None:
            heappush(self.ready, (e.rank, e.seq, e))
        elif self.sessions[sid][0] is e:
            heappush(self.ready, (e.rank, e.seq, e))

    def held_session(self, session_id: str | None) -> bool:
        """Does ``session_id`` wait behind a held entry (so that a request added to it would never start)?"""
        q = self.sessions.get(session_id) if session_id is not None else None
        return bool(q) and q[0].seq <= self.hold_through  # type: ignore[index]

    def is_head(self, e: Entry) -> bool:
        """Is ``e`` the first unfinished entry of its session (or of no session)?"""
        return e.session_id is None or self.sessions[e.session_id][0] is e

    def restore(self, entries: Iterable[Entry]) -> None:
        """Bulk-add QUEUED entries given in submission order (start-up)."""
        sessions = self.sessions
        ready = self.ready
        for e in entries:
            sid = e.session_id
            if sid is None:
                ready.append((e.rank, e.seq, e))
                continue
            q = sessions.get(sid)
            if q is None:
                sessions[sid] = deque((e,))
            else:
                q.append(e)
        for q in sessions.values():
            head = q[0]
            if head.state == QUEUED:
                ready.append((head.rank, head.seq, head))
        heapify(ready)

    # -- running -------------------------------------------------------------

    def take(self) -> list[Entry]:
        """Pop the entries that may start now, best first; they become RUNNING."""
        out: list[Entry] = []
        ready = self.ready
        limits = self.model_limits
        while self.in_flight < self.limit and ready:
            item = heappop(ready)
            e = item[2]
            if e.state != QUEUED or e.seq <= self.hold_through:
                continue  # cancelled (or a duplicate push), or held
            if limits:
                m = e.model
                lim = limits.get(m)
                if lim is not None:
                    if self.model_in_flight[m] >= lim:
                        heappush(self.blocked[m], item)
                        continue
                    self.model_in_flight[m] += 1
            e.state = RUNNING
            self.in_flight += 1
            out.append(e)
        return out

    def executed(self, e: Entry) -> None:
        """``e`` left RUNNING (result in hand, cancelled or crashed): free its slot.
        Its session still waits until :meth:`done`."""
        e.state = STORING
        self.in_flight -= 1
        m = e.model
        if m in self.model_in_flight:
            self.model_in_flight[m] -= 1
            b = self.blocked[m]
            while b:
                item = heappop(b)
                if item[2].state == QUEUED:
                    heappush(self.ready, item)
                    break

    def done(self, e: Entry) -> None:
        """``e`` is final (stored) or dropped: its session moves on."""
        e.state = DONE
        sid = e.session_id
        if sid is None:
            return
        q = self.sessions.get(sid)
        if q is None or q[0] is not e:
            return  # not the head: skipped when it reaches the head
        q.popleft()
        while q and q[0].state == DONE:
            q.popleft()
        if not q:
            del self.sessions[sid]
            return
        head = q[0]
        if head.state == QUEUED:
            heappush(self.ready, (head.rank, head.seq, head))

    def session_entries(self, session_id: str) -> list[Entry]:
        return list(self.sessions.get(session_id, ()))
