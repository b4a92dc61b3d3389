"""Which requests are running, and stopping new ones from starting (the first Ctrl-C of ``ksi-host run``).

The queue runs a request by calling ``host.execute(request)``. :class:`ExecuteGate`
stands in front of that method of one Host: it keeps the ids of the requests inside
it (the progress bar's "running"), and once :meth:`close` is called, a request that
arrives waits there without calling any provider until the host stops (the queue's
shutdown cancels it, and it stays stored unfinished for the next run). The requests
already running go on to their final results.

This uses only the Host API a queue plugin sees. If the Host grows a way to stop
starting requests (``host.drain()``), this class becomes a call to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..models import CompletionRequest, CompletionResult


class ExecuteGate:
    """Wraps ``host.execute`` of one Host: see the module docstring. ``on_executed(request_id)`` is
    called as each request's ``host.execute`` returns its result."""

    def __init__(self, host: Any, on_executed: Callable[[str], None] | None = None) -> None:
        self._execute = host.execute
        self._on_executed = on_executed
        self.running: set[str] = set()
        self.closed = False
        self._idle: asyncio.Event | None = None
        host.execute = self.execute

    async def execute(self, request: CompletionRequest, **kw: Any) -> CompletionResult:
        if self.closed:
            # never set: the host's shutdown cancels this wait; the request stays stored unfinished
            await asyncio.get_running_loop().create_future()
        rid = request.request_id
        self.running.add(rid)
        try:
            result = await self._execute(request, **kw)  # (submitted_at=...: when the queue accepted it)
        finally:
            self.running.discard(rid)
            if self._idle is not None and not self.running:
                self._idle.set()
        if self._on_executed is not None:
            self._on_executed(rid)  # its result is final: the queue stores it, then completes its tickets
        return result

    def close(self) -> None:
        """Start no more requests; the running ones finish."""
        self.closed = True
        self._idle = asyncio.Event()
        if not self.running:
            self._idle.set()

    async def idle(self) -> None:
        """Return once :meth:`close` was called and no request is running."""
        if self._idle is None:
            raise RuntimeError("ExecuteGate.idle() before close()")
        await self._idle.wait()


class OwnOnlyGate:
    """Wraps ``host.execute`` of one Host so that only the requests in ``own`` run (``ksi-host ask``).

    A queue that serves a database starts the unfinished requests an earlier run left in it; here
    they wait without calling any provider until the host stops, and stay stored unfinished for
    the next ``ksi-host run``. ``held`` counts them; ``started`` is set once an own request runs.
    Install it before the host starts: a queue starts them while the plugins start.
    """

    def __init__(self, host: Any, own: set[str]) -> None:
        self._execute = host.execute
        self.own = own
        self.held = 0
        self.started = asyncio.Event()
        host.execute = self.execute

    async def execute(self, request: CompletionRequest, **kw: Any) -> CompletionResult:
        if request.request_id not in self.own:
            self.held += 1
            # never set: the host's shutdown cancels this wait; the request stays stored unfinished
            await asyncio.get_running_loop().create_future()
        self.started.set()
        return await self._execute(request, **kw)
