"""Sliding rate windows: the store interface a plugin may provide (``ksi_window_store``).

A rate-limiting plugin (ksi-limits) keeps one window per *key*: one rule (its
index in the limiting plugin's config) and one name it matched (a deployment,
an agent, a model). A window counts, over its last ``window_s`` seconds, the
requests and tokens sent, and the attempts in flight. One attempt takes a
*lease* over several keys at once (its deployment's, its agent's, its
model's), all or none:

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

The limiting plugin keeps its windows in its own process's memory unless a
plugin that keeps state shared by several hosts offers a store
(``ksi_window_store``; ksi-postgres does when it is configured). A shared
store implements the same five methods over its database; its ``poll_s``
tells waiters to look again that often, since room freed by another host
wakes nobody here, and ``shared`` tells the limiting plugin not to count the
ledger's recent calls into it at start-up (the store outlives the process).

Times: ``now`` is the caller's clock (``host.clock``: monotonic, per process).
A store shared by hosts cannot compare such readings between hosts: it keeps
its own times on one clock (its database's) and gives a :class:`Refusal`'s
``retry_at`` back on the caller's clock (``now`` plus the delay it computed).

Like a hookimpl, each method answers at once or returns an awaitable of its
answer: an in-process store answers at once (so an admission with room costs
no coroutine); a shared store, which does I/O, returns awaitables. A store
whose database fails raises :class:`~ksi_host.errors.DatabaseError` (an
operational failure: the attempt is refused with it); anything else it raises
is a programming error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Hashable, Sequence
from typing import Protocol

import attrs

__all__ = ["Claim", "Key", "Limit", "Refusal", "WindowState", "WindowStore"]

Key = tuple[int, str]
"""A window's key: the rule's index (in the limiting plugin's config) and the name it matched."""


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
    """Why ``take`` took nothing: the ``keys`` that lack room now, and ``retry_at`` (a reading of the caller's
    clock), when the windows sliding on will have made room in all of them; None when only the end of calls in
    flight can make it (``settle`` and ``release`` say when)."""

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
        """Count ``requests`` and ``tokens`` sent before this process started (from the ledger), as of ``now``
        (called only when ``shared`` is false)."""

    def snapshot(self, now: float) -> dict[Key, WindowState] | Awaitable[dict[Key, WindowState]]:
        """Every window the store knows, as of ``now``."""
