"""Fixtures of the ksi-serve tests: the server in-process over a Host of test plugins, called with the stock
``openai`` client (AsyncOpenAI: the server runs on the test's own event loop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from ksi_serve.app import HTTP_LOG, Server
from ksi_serve.auth import Gate
from ksi_serve.config import ClientConfig, ServeConfig
from ksi_serve.metrics import Metrics
from ksi_serve.plugin import Plugin

from ksi_host import CompletionRequest, CompletionResult, Host, Ticket, hookimpl


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds; AssertionError after ``timeout_s`` (a test never hangs)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


class MemoryQueue:
    """A queue kept in memory: runs each request at once (no order), one run per request id (a request id
    seen before gets that run's ticket), ``ksi_request_details``, ``ksi_cancel`` and ``ksi_drain``."""

    def __init__(self) -> None:
        self.tickets: dict[str, Ticket] = {}
        self.requests: dict[str, CompletionRequest] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.drained = 0

    @hookimpl
    def ksi_enqueue(self, host: Host, request: CompletionRequest) -> Ticket:
        rid = request.request_id
        if rid in self.tickets:
            return self.tickets[rid]
        ticket = self.tickets[rid] = Ticket(rid)
        self.requests[rid] = request

        async def run() -> None:
            try:
                ticket.set_result(await host.execute(request))
            except asyncio.CancelledError:
                from ksi_host import Cancelled

                ticket.set_result(await host.request_finished(request, CompletionResult.failed(
                    rid, Cancelled("cancelled"), model=request.model)))
            except BaseException as e:
                ticket.set_exception(e)

        self.tasks[rid] = asyncio.ensure_future(run())
        return ticket

    @hookimpl
    def ksi_request_details(self, request_id: str) -> dict[str, Any] | None:
        ticket = self.tickets.get(request_id)
        if ticket is None:
            return None
        result = ticket.future.result() if ticket.is_done() and not ticket.future.exception() else None
        return {"request": self.requests[request_id].to_dict(),
                "state": result.status if result is not None else "running",
                "result": result.to_dict() if result is not None else None}

    @hookimpl
    def ksi_cancel(self, request_id: str) -> bool | None:
        task = self.tasks.get(request_id)
        if task is None:
            return None
        if task.done():
            return False
        task.cancel()
        return True

    @hookimpl
    async def ksi_drain(self) -> None:
        self.drained += 1
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running)

    @hookimpl
    async def ksi_shutdown(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


class Served:
    """A running server: ``url`` (the OpenAI base URL), ``client(key=...)`` an AsyncOpenAI for it, ``host``,
    ``server`` (:class:`ksi_serve.app.Server`), ``crashes`` (programming errors reported)."""

    def __init__(self, host: Host, server: Server, url: str) -> None:
        self.host = host
        self.server = server
        self.url = url
        self.base = url.removesuffix("/v1")
        self.crashes: list[BaseException] = []

    def client(self, key: str = "no-key", **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)  # a test never hangs
        return openai.AsyncOpenAI(base_url=self.url, api_key=key, **kw)


@pytest.fixture
def serve(make_host: Callable[..., Host]) -> Callable[..., Any]:
    """``async with serve(*plugins, serve={...}, environ={...}) as s:`` the server on 127.0.0.1 (any port) over
    a Host of ``plugins`` plus the serve plugin (and MemoryQueue unless a queue is given: ``queue=...``)."""

    @contextlib.asynccontextmanager
    async def factory(*plugins: Any, serve: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
                      queue: Any = None, config: dict[str, Any] | None = None) -> AsyncIterator[Served]:
        table = dict(serve or {})
        clients = [ClientConfig(**c) for c in table.pop("clients", [])]
        cfg = ServeConfig(clients=clients, **table)
        gate = Gate.from_config(clients, environ or {})
        plugin = Plugin()
        async with make_host(queue if queue is not None else MemoryQueue(), *plugins, plugin,
                             config={**(config or {}), "serve": {}}) as host:
            plugin.metrics = Metrics()
            crashes: list[BaseException] = []
            server = Server(host, cfg, gate, plugin.metrics, crashes.append)
            runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=5, logger=HTTP_LOG,
                                   keepalive_timeout=cfg.idle_timeout_s)  # (as ksi_serve.command runs it)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            served = Served(host, server, f"http://127.0.0.1:{port}/v1")
            served.crashes = crashes
            try:
                yield served
            finally:
                server.release_waiters()
                await runner.cleanup()

    return factory
