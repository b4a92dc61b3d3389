"""Where the windows live: the :class:`WindowStore` interface and the in-process :class:`LocalWindowStore`.

A window is kept per *key*: one rule (its index in ``[[limits.rules]]``) and
one name it matched (a deployment, an agent, a model). It counts, over its
last ``window_s`` seconds, the requests and tokens sent, and the attempts in
flight. One attempt takes a *lease* over several keys at once (its
deployment's, its agent's, its model's), all or none:

* ``take`` reserves the attempt's estimated tokens, one request and one
  concurrency slot in every key, if every key has room; else it takes nothing
  and says which keys lack room and when the windows alone will have made
  room (:class:`Refusal`).
* ``settle`` ends an attempt that was sent: its slot is freed and its tokens
  become what the upstream reported (or stay the reservation), counted from
  *now*, when the call ended, for ``window_s`` seconds.
* ``release`` ends an attempt that sent nothing: it leaves no trace.

Why an entry counts from its reservation until ``window_s`` after its call
ended: the upstream counts a request when it arrives, at some moment between
our reservation and the end of the call. Counted that way, any set of requests
that arrive upstream within ``window_s`` of each other were all counted
together at the admission of the last of them, so the upstream never sees
more than the limit in any window, whatever the network's delays (as long as
no call uses more tokens than it reserved). A call holds its tokens for its
own duration longer than a window counted from the send would; that is the
price of the bound.

A store shared by several hosts (a Postgres table, one row per key and one per
lease, taken in one transaction with ``SELECT ... FOR UPDATE``) implements the
same five methods; its ``poll_s`` tells waiters to look again that often,
since room freed by another host wakes nobody here.

Like a hookimpl, each method answers at once or returns an awaitable of its
answer: :class:`LocalWindowStore` answers at once (so an admission with room
costs no coroutine); a shared store, which does I/O, returns awaitables.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Hashable, Sequence
from typing import Protocol

import attrs

Key = tuple[int, str]
"""A window's key: the rule's index in ``[[limits.rules]]`` and the name it matched."""


@attrs.frozen(slots=True)
class Limit:
    """What one window allows: per ``window_s`` seconds at most ``rpm`` requests and ``tpm`` tokens;
    at most ``concurrency`` attempts in flight. None: no limit of that kind."""

    window_s: float
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


@attrs.frozen(slots=True)
class Claim:
    """What one attempt asks of one window: one request and ``tokens`` tokens."""

    key: Key
    limit: Limit
    tokens: int


@attrs.frozen(slots=True)
class Refusal:
    """Why ``take`` took nothing: the ``keys`` that lack room now, and ``retry_at`` (a ``host.clock``
    reading), when the windows sliding on will have made room in all of them; None when only the end of
    calls in flight can make it (``settle`` and ``release`` say when)."""

    keys: tuple[Key, ...]
    retry_at: float | None


@attrs.frozen(slots=True)
class WindowState:
    """One window now: requests and tokens counted (reservations in flight included), attempts in flight."""

    requests: int
    tokens: int
    in_flight: int


class WindowStore(Protocol):
    """The windows of every key, behind the five operations an admission needs (see the module docstring).
    Each method returns its answer, or an awaitable of it."""

    poll_s: float | None
    """How often a waiter looks again without being woken (None: room is always announced)."""
    shared: bool
    """Are the windows kept outside this process (shared by hosts)? If not, they start from the ledger."""

    def take(self, lease: Hashable, claims: Sequence[Claim], now: float) -> Refusal | None | Awaitable[Refusal | None]:
        """Reserve every claim under ``lease``, or none: None when taken, else why not."""

    def settle(self, lease: Hashable, tokens: int | None, now: float) -> tuple[Key, ...] | Awaitable[tuple[Key, ...]]:
        """The lease's call ended at ``now``: free its slots, count ``tokens`` (None: what it reserved) and
        its request from now on. Returns the keys it held (nothing if the lease is unknown)."""

    def release(self, lease: Hashable, now: float) -> tuple[Key, ...] | Awaitable[tuple[Key, ...]]:
        """The lease's attempt sent nothing: forget it. Returns the keys it held."""

    def seed(self, key: Key, limit: Limit, requests: int, tokens: int, now: float) -> None | Awaitable[None]:
        """Count ``requests`` and ``tokens`` sent before this process started (from the ledger), as of ``now``."""

    def snapshot(self, now: float) -> dict[Key, WindowState] | Awaitable[dict[Key, WindowState]]:
        """Every window the store knows, as of ``now``."""


GRAIN = 1000
"""A window's log holds about this many entries at most: calls that end within ``window_s / GRAIN`` seconds of
the last entry join it (stamped at the later end, so each still counts at least ``window_s`` after its own end:
a window of 60 s counts a call up to 60 ms longer). At 5,000 calls a second, a 60 s window holds 1,000 entries
instead of 300,000 (about 20 MB)."""


class Window:
    """One key's sliding window: a log of ``(ended_at, tokens, requests)`` plus what is in flight."""

    __slots__ = ("limit", "grain", "log", "log_tokens", "log_requests", "flight_tokens", "flight_requests")

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.grain = limit.window_s / GRAIN
        self.log: deque[tuple[float, int, int]] = deque()  # in time order: entries are appended at "now"
        self.log_tokens = 0
        self.log_requests = 0
        self.flight_tokens = 0
        self.flight_requests = 0

    def expire(self, now: float) -> None:
        """Drop the entries that ended ``window_s`` or more ago."""
        log = self.log
        horizon = now - self.limit.window_s
        while log and log[0][0] <= horizon:
            _, tokens, requests = log.popleft()
            self.log_tokens -= tokens
            self.log_requests -= requests

    def fits(self, tokens: int) -> bool:
        """Is there room for one more request of ``tokens`` now (call :meth:`expire` first)?"""
        limit = self.limit
        return ((limit.tpm is None or self.log_tokens + self.flight_tokens + tokens <= limit.tpm)
                and (limit.rpm is None or self.log_requests + self.flight_requests < limit.rpm)
                and (limit.concurrency is None or self.flight_requests < limit.concurrency))

    def retry_at(self, tokens: int) -> float | None:
        """When entries leaving the log will have made room for ``tokens`` (None: the log alone cannot)."""
        limit = self.limit
        if limit.concurrency is not None and self.flight_requests >= limit.concurrency:
            return None
        excess_tokens = 0 if limit.tpm is None else self.log_tokens + self.flight_tokens + tokens - limit.tpm
        excess_requests = 0 if limit.rpm is None else self.log_requests + self.flight_requests + 1 - limit.rpm
        freed_tokens = freed_requests = 0
        for ended, entry_tokens, requests in self.log:
            freed_tokens += entry_tokens
            freed_requests += requests
            if freed_tokens >= excess_tokens and freed_requests >= excess_requests:
                return ended + limit.window_s
        return None

    def add(self, now: float, tokens: int, requests: int) -> None:
        log = self.log
        if log and now - log[-1][0] < self.grain:  # see GRAIN
            _, last_tokens, last_requests = log[-1]
            log[-1] = (now, last_tokens + tokens, last_requests + requests)
        else:
            log.append((now, tokens, requests))
        self.log_tokens += tokens
        self.log_requests += requests

    def state(self, now: float) -> WindowState:
        self.expire(now)
        return WindowState(self.log_requests + self.flight_requests, self.log_tokens + self.flight_tokens,
                           self.flight_requests)


class LocalWindowStore:
    """The windows in this process's memory: exact and cheap, shared by every request of this host (and so
    by the one process that serves a database). Its methods answer at once."""

    poll_s: float | None = None
    shared = False

    def __init__(self) -> None:
        self.windows: dict[Key, Window] = {}
        self.leases: dict[Hashable, list[tuple[Window, int, Key]]] = {}

    def _window(self, key: Key, limit: Limit) -> Window:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(limit)
        return window

    def take(self, lease: Hashable, claims: Sequence[Claim], now: float) -> Refusal | None:
        if lease in self.leases:
            raise RuntimeError(f"lease {lease!r} is already held")
        windows = []
        refused: list[tuple[Key, Window, int]] = []
        for claim in claims:
            window = self._window(claim.key, claim.limit)
            window.expire(now)
            if not window.fits(claim.tokens):
                refused.append((claim.key, window, claim.tokens))
            windows.append((window, claim.tokens, claim.key))
        if refused:
            times = [w.retry_at(tokens) for _, w, tokens in refused]
            retry_at = None if None in times else max(times)  # type: ignore[type-var]
            return Refusal(tuple(key for key, _, _ in refused), retry_at)
        for window, tokens, _ in windows:
            window.flight_tokens += tokens
            window.flight_requests += 1
        self.leases[lease] = windows
        return None

    def settle(self, lease: Hashable, tokens: int | None, now: float) -> tuple[Key, ...]:
        held = self.leases.pop(lease, None)
        if held is None:
            return ()
        for window, reserved, _ in held:
            window.flight_tokens -= reserved
            window.flight_requests -= 1
            window.add(now, reserved if tokens is None else tokens, 1)
        return tuple(key for _, _, key in held)

    def release(self, lease: Hashable, now: float) -> tuple[Key, ...]:
        held = self.leases.pop(lease, None)
        if held is None:
            return ()
        for window, reserved, _ in held:
            window.flight_tokens -= reserved
            window.flight_requests -= 1
        return tuple(key for _, _, key in held)

    def seed(self, key: Key, limit: Limit, requests: int, tokens: int, now: float) -> None:
        self._window(key, limit).add(now, tokens, requests)

    def snapshot(self, now: float) -> dict[Key, WindowState]:
        return {key: window.state(now) for key, window in self.windows.items()}
