"""Waiting for room, in arrival order: :class:`Admission`.

An attempt asks the :class:`~ksi_host.windows.WindowStore` for room in every
window it needs (its deployment's, its agent's, its model's). When every one
has room and nobody waits on any of them, it goes at once. Otherwise it waits,
in the queue of each window that lacked room (and of each window where an
earlier attempt waits), and keeps its place there until it goes:

* FIFO per window: an attempt never passes one that arrived earlier and waits
  on the same window, so a big request is not starved by small ones behind it.
* No deadlock: the earliest waiter is first in every queue it is in, so only
  room holds it back, and room comes, with time (the window slides on) or
  when calls in flight end (``settle``/``release`` wake the first waiter of
  each of their windows).
* A waiter that leaves (admitted, or cut off by its request's deadline or a
  cancel) wakes the next one of each queue it headed.

Waiting costs nothing on the fast path: with nobody waiting on its windows, an
attempt makes one ``take`` and goes.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

from ksi_host.windows import Claim, Key, WindowStore


async def answer(value: Any) -> Any:
    """``value``, or what it gives if it is awaitable (a store's answer: see :class:`WindowStore`)."""
    return await value if hasattr(value, "__await__") else value


class Waiter:
    """One attempt waiting for room: its arrival number and the future that wakes it."""

    __slots__ = ("seq", "woken")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.woken: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(None)


def _seq(w: Waiter) -> int:
    return w.seq


class Admission:
    """The windows' queues of one host, in front of one :class:`WindowStore`. ``clock`` and ``sleep`` are the
    host's (``host.clock``, ``host.sleep``)."""

    def __init__(self, store: WindowStore, clock: Callable[[], float], sleep: Callable[[float], Awaitable[Any]]) -> None:
        self.store = store
        self.clock = clock
        self.sleep = sleep
        self.queues: dict[Key, list[Waiter]] = {}  # each sorted by arrival
        self._arrivals = 0

    def waiting(self, key: Key) -> int:
        """How many attempts wait in ``key``'s queue."""
        return len(self.queues.get(key, ()))

    def acquire(self, lease: Hashable, claims: Sequence[Claim]) -> Awaitable[None] | None:
        """Reserve every claim under ``lease``: None when that was done at once (nobody waits on these windows
        and they have room), else an awaitable that returns once it is done (waiting for room, in order)."""
        queues = self.queues
        if queues and any(c.key in queues for c in claims):
            return self._wait(lease, claims, None)
        refusal = self.store.take(lease, claims, self.clock())
        return None if refusal is None else self._wait(lease, claims, refusal)

    async def _wait(self, lease: Hashable, claims: Sequence[Claim], refusal: Any) -> None:
        """``refusal``: the store's first answer (a Refusal, or an awaitable of one), or None when others wait."""
        if hasattr(refusal, "__await__"):  # a shared store's first answer
            refusal = await refusal
            if refusal is None:
                return
        self._arrivals += 1
        me = Waiter(self._arrivals)
        joined: list[Key] = []
        loop = asyncio.get_running_loop()
        try:
            while True:
                me.woken = loop.create_future()  # before looking: a wake-up from now on is not lost
                if refusal is None:
                    ahead = [c.key for c in claims if self._ahead(c.key, me)]
                    if ahead:
                        blocked, retry_at = ahead, None
                    else:
                        refusal = await answer(self.store.take(lease, claims, self.clock()))
                        if refusal is None:
                            return
                if refusal is not None:
                    blocked, retry_at = list(refusal.keys), refusal.retry_at
                    refusal = None
                for key in blocked:
                    if key not in joined:
                        bisect.insort(self.queues.setdefault(key, []), me, key=_seq)
                        joined.append(key)
                await self._pause(me.woken, retry_at)
        finally:
            for key in joined:
                queue = self.queues[key]
                first = queue[0] is me
                queue.remove(me)
                if not queue:
                    del self.queues[key]
                elif first:
                    queue[0].wake()

    def _ahead(self, key: Key, me: Waiter) -> bool:
        """Does an attempt that arrived before ``me`` wait on ``key``?"""
        queue = self.queues.get(key)
        return bool(queue) and queue[0].seq < me.seq  # type: ignore[index]

    async def _pause(self, woken: asyncio.Future[None], retry_at: float | None) -> None:
        """Until woken, or until ``retry_at`` (a clock reading), or ``store.poll_s`` seconds, whichever comes first."""
        delay = None if retry_at is None else max(0.0, retry_at - self.clock())
        poll = self.store.poll_s
        if poll is not None:
            delay = poll if delay is None else min(delay, poll)
        if delay is None:
            await woken
            return
        sleeper = asyncio.ensure_future(self.sleep(delay))
        try:
            await asyncio.wait((woken, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    def wake(self, keys: Sequence[Key]) -> None:
        """Room may have appeared in ``keys``: wake the first waiter of each."""
        for key in keys:
            queue = self.queues.get(key)
            if queue:
                queue[0].wake()
