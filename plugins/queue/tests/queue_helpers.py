"""Test doubles for the queue: a provider whose calls wait at a gate, and small helpers."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

from ksi_host.models import CompletionRequest, ProviderResponse, Usage

MESSAGES = [{"role": "user", "content": "hi"}]


def req(request_id: str, session_id: str | None = None, **kw: Any) -> CompletionRequest:
    kw.setdefault("model", "m")
    return CompletionRequest(messages=MESSAGES, request_id=request_id, session_id=session_id, **kw)


class GatedProvider:
    """A deployment whose calls wait until released (all at once with ``open=True``).

    ``calls`` lists request ids in call order; ``active`` / ``max_active`` count
    calls in progress; ``on_call(request)`` runs at the start of every call;
    ``wait_calls(n)`` returns once ``n`` calls have started (no polling).
    ``fail`` maps request ids to an exception to raise instead of answering.
    """

    def __init__(self, name: str = "gate", model: str = "*", *, open: bool = False,
                 on_call: Callable[[CompletionRequest], None] | None = None) -> None:
        self.name = name
        self.model = model
        self.timeout_s: float | None = None
        self.open = open
        self.on_call = on_call
        self.calls: list[str] = []
        self.active = 0
        self.max_active = 0
        self.fail: dict[str, BaseException] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def _gate(self, request_id: str) -> asyncio.Event:
        gate = self._gates.get(request_id)
        if gate is None:
            gate = self._gates[request_id] = asyncio.Event()
        return gate

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse:
        rid = request.request_id
        self.calls.append(rid)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for n, fut in list(self._waiters):
            if len(self.calls) >= n and not fut.done():
                fut.set_result(None)
        try:
            if self.on_call is not None:
                self.on_call(request)
            if not self.open:
                await self._gate(rid).wait()
            if rid in self.fail:
                raise self.fail[rid]
            return ProviderResponse(text=f"answer to {rid}", usage=Usage(3, 2, 5, 0.001))
        finally:
            self.active -= 1

    def release(self, *request_ids: str) -> None:
        for rid in request_ids:
            self._gate(rid).set()

    def release_all(self) -> None:
        self.open = True
        for gate in self._gates.values():
            gate.set()

    async def wait_calls(self, n: int, timeout: float = 5.0) -> None:
        if len(self.calls) >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await asyncio.wait_for(fut, timeout)


async def settle(rounds: int = 20) -> None:
    """Let the event loop run everything that is ready (no clock involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def stored_only(db_path: Any) -> Any:
    """Create ``db_path`` empty, for a host that does not serve (``serve=False`` opens an existing database only)
    and stores requests for a later serving host."""
    open(db_path, "ab").close()
    return db_path


def rows(db_path: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the database file through a separate connection (what another process would see)."""
    conn = sqlite3.connect(str(db_path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def status_of(db_path: Any, request_id: str) -> str | None:
    found = rows(db_path, "SELECT status FROM ksi_queue_requests WHERE request_id = ?", (request_id,))
    return found[0][0] if found else None
