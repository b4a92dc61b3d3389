"""Where the windows live: the in-process :class:`LocalWindowStore`.

The interface (:class:`~ksi_host.windows.WindowStore`) and its value types (``Key``, ``Limit``, ``Claim``,
``Refusal``, ``WindowState``) are the host's (:mod:`ksi_host.windows`, where what a window counts and why is
told), so that a plugin that keeps state shared by several hosts can offer a store (``ksi_window_store``)
without importing this one; they are re-exported here. :class:`LocalWindowStore` keeps every window in this
process's memory: the windows of one host, and so of the one process that serves a SQLite database.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence

from ksi_host.windows import Claim, Key, Limit, Refusal, WindowState, WindowStore

__all__ = ["GRAIN", "Claim", "Key", "Limit", "LocalWindowStore", "Refusal", "Window", "WindowState", "WindowStore"]

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
