"""The orchestrator: a thin layer that only sequences hooks.

``async with Host(config, db_path) as host:`` loads plugins, validates the
config, opens the database and starts the plugins. ``await host.submit(r)``
hands a request to the queue (``ksi_enqueue``) and returns a ticket;
``await host.complete(r)`` waits for the result. When the queue runs a request
it calls :meth:`Host.execute`, which runs the hooks of one request in the
order ``ksi_host.hookspecs`` draws: prepare, then per attempt select, admit,
record the call, call the provider, record how it ended, decide on a failure,
tell the observers; and at the end tell the observers of the result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import pluggy

from . import hookspecs
from .attempts import AttemptRunner
from .config import HOST_TABLE, build_config, load_config
from .db import Database, default_db_path
from .errors import (
    DatabaseError,
    MissingPluginError,
    OperationalError,
    StartupError,
)
from .hooks import HookCaller, check_hook_names
from .models import (
    Attempt,
    CompletionRequest,
    CompletionResult,
    ProviderInfo,
    RequestQuery,
    Ticket,
    Usage,
)
from .plugins import PluginInfo, register
from .streaming import CompletionStream, StreamSink

log = logging.getLogger("ksi_host")
_NO_USAGE = Usage()


class Host:
    """The KSI host. See the module docstring.

    ``config``: a dict of tables, a path to a TOML file, or None (then
    ``KSI_HOST_CONFIG`` if set). ``db_path``: the database file (None:
    ``KSI_HOST_DB`` or ``ksi-host.db``). ``plugins``: plugin objects to use
    instead of entry points (classes are instantiated). ``serve``: False for
    read-only use (no queued work is run). ``resume``: False to serve only the requests submitted to this Host
    (a queue starts none that earlier runs left stored: see ``ksi_startup``). ``clock``/``sleep``: injectable
    time. ``executing``: the ids of the requests whose :meth:`execute` is under way (read only).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        db_path: str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[Any] | None = None,
        serve: bool = True,
        resume: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if config is None:
            config = os.environ.get("KSI_HOST_CONFIG")
        self._raw_config = dict(config) if isinstance(config, Mapping) else load_config(config)
        self.db_path = str(db_path) if db_path is not None else default_db_path()
        self._explicit = list(plugins) if plugins is not None else None
        self.serve = serve
        self.resume = resume
        self.clock = clock
        self.sleep = sleep
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.hooks = HookCaller(self.pm)
        self.plugins: list[PluginInfo] = []
        self.config: dict[str, Any] = {}
        self.db: Database | None = None
        self._started: list[str] = []
        self._attempts = AttemptRunner(self)
        self.streams: dict[str, StreamSink] = {}  # request id -> where its streamed pieces go
        self.executing: set[str] = set()  # request ids whose execute is under way (see the class docstring)

    # -- life cycle -------------------------------------------------------------

    async def __aenter__(self) -> Host:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.plugins = register(self.pm, self._explicit)
        check_hook_names(self.pm)
        self.hooks.reset()
        specs = await self.hooks.config_specs()
        self.config = build_config(self._raw_config, specs, self.hooks.table_owners)
        logging.getLogger("ksi_host").setLevel(self.config[HOST_TABLE].log_level.upper())
        for name in await self.hooks.claim_exclusive(self):  # plugins left idle by ksi_exclusive_hooks
            self.plugins = [p for p in self.plugins if p.name != name]
        path = self.db_path
        if not self.serve and self.hooks.claimed and not os.path.exists(path):
            path = ":memory:"  # a shared store (ksi-postgres) holds the queue and ledger: nothing to read locally
        self.db = await Database(path, create=self.serve).open()
        try:
            for impl in reversed(self.hooks.impls("ksi_startup")):  # registration order
                try:
                    await self.hooks.call_impl(impl, "ksi_startup", {"host": self})
                except DatabaseError as e:  # found before any request ran: a start-up error (exit 2)
                    raise (e if isinstance(e, StartupError) else e.at_startup()) from None
                self._started.append(impl.plugin)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        try:
            for impl in self.hooks.impls("ksi_shutdown"):
                if impl.plugin in self._started:  # newest first: reverse registration order
                    await self.hooks.call_impl(impl, "ksi_shutdown", {"host": self})
            await self._attempts.drain()  # records of attempts cut short by a cancel
        finally:
            self._started.clear()
            if self.db is not None:
                await self.db.close()
                self.db = None

    @property
    def concurrency(self) -> int | None:
        """The host-level concurrency override (``[host] concurrency``), if any."""
        return self.config[HOST_TABLE].concurrency if self.config else None

    # -- the public API ------------------------------------------------------------

    def _need(self, hook: str, **kwargs: Any) -> Awaitable[Any]:
        """``hooks.first(hook, ...)`` to await; MissingPluginError if no plugin implements ``hook``."""
        if not self.hooks.implemented(hook):
            raise MissingPluginError(hook, hookspecs.INSTALL_HINTS.get(hook))
        return self.hooks.first(hook, host=self, **kwargs)

    @staticmethod
    def _request(request: CompletionRequest | Mapping[str, Any]) -> CompletionRequest:
        if isinstance(request, CompletionRequest):
            return request
        return CompletionRequest.from_dict(dict(request))

    async def submit(self, request: CompletionRequest | Mapping[str, Any]) -> Ticket:
        """Queue a request (a CompletionRequest or a dict); return its ticket.

        Returns once the queue has accepted (and stored) the request. Raises
        ValidationError for bad input, MissingPluginError with no queue plugin.
        """
        ticket = await self._need("ksi_enqueue", request=self._request(request))
        if not isinstance(ticket, Ticket):
            raise TypeError(f"ksi_enqueue returned {ticket!r}, not a Ticket")
        return ticket

    async def complete(self, request: CompletionRequest | Mapping[str, Any]) -> CompletionResult:
        """Submit a request and wait for its final result."""
        # The ticket is this call's own, so its future is awaited directly: cancelling
        # this call cancels only that future (Ticket.result shields it for shared use).
        return await (await self.submit(request)).future

    async def cancel(self, request_id: str) -> bool:
        return bool(await self._need("ksi_cancel", request_id=request_id))

    async def clear_session(self, session_id: str) -> int:
        return int(await self._need("ksi_clear_session", session_id=session_id) or 0)

    async def status(self) -> dict[str, Any]:
        """Every plugin's status sections, merged."""
        merged: dict[str, Any] = {}
        for section in await self.hooks.call("ksi_status", host=self):
            for key, value in section.items():  # lists of one name (e.g. circuits) are joined
                if isinstance(value, list) and isinstance(merged.get(key), list):
                    merged[key] = merged[key] + value
                else:
                    merged[key] = value
        return merged

    async def usage_report(self, by: str = "model", since: float | None = None) -> list[dict[str, Any]]:
        return list(await self._need("ksi_usage_report", by=by, since=since))

    async def providers(self, model: str | None = None) -> list[ProviderInfo]:
        """Every provider plugin's deployments serving ``model`` (all if None), in try order."""
        return [p for found in await self.hooks.call("ksi_list_providers", host=self, model=model) for p in found]

    async def drain(self) -> None:
        """Start no more requests; return once the running ones have their results stored (``ksi_drain``)."""
        await self.hooks.call("ksi_drain", host=self)

    async def request_details(self, request_id: str) -> dict[str, Any] | None:
        """Every plugin's sections about one request (``ksi_request_details``), merged; None if none knows it."""
        merged: dict[str, Any] = {}
        for sections in await self.hooks.call("ksi_request_details", host=self, request_id=request_id):
            merged.update(sections)
        return merged or None

    async def list_requests(self, query: RequestQuery | None = None) -> list[dict[str, Any]]:
        """Recent requests, newest first (``ksi_list_requests``)."""
        return list(await self._need("ksi_list_requests", query=query or RequestQuery()))

    def stream(self, request: CompletionRequest | Mapping[str, Any], *, cancel_on_exit: bool = True) -> CompletionStream:
        """Submit a request and stream its answer: ``async for delta in host.stream(r)``, then ``stream.result``
        (see :mod:`ksi_host.streaming`). Leaving the loop early cancels it unless ``cancel_on_exit`` is False."""
        return CompletionStream(self, self._request(request), cancel_on_exit=cancel_on_exit)

    async def request_finished(self, request: CompletionRequest, result: CompletionResult) -> CompletionResult:
        """Tell the ``ksi_request_finished`` observers about a final result; return it. ``host.execute``
        calls this for its results; a queue calls it for results it makes itself (a cancel)."""
        if self.hooks.implemented("ksi_request_finished"):
            await self.hooks.notify("ksi_request_finished", host=self, request=request, result=result)
        return result

    # -- running one request (called by the queue) ------------------------------

    async def execute(self, request: CompletionRequest, *, submitted_at: float | None = None,
                      attempts: list[Attempt] | None = None) -> CompletionResult:
        """Run ``request`` now: attempts, failure handling, usage; an OperationalError becomes an error result, programming
        errors propagate. ``submitted_at``: when it was queued. ``attempts``: gets each attempt as it ends (one cut short too)."""
        rid = request.request_id
        self.executing.add(rid)
        try:
            return await self._execute(request, submitted_at, [] if attempts is None else attempts)
        finally:
            self.executing.discard(rid)

    async def _execute(self, request: CompletionRequest, submitted_at: float | None, history: list[Attempt]) -> CompletionResult:
        started_wall, started = time.time(), self.clock()
        deadline = started + request.timeout_s if request.timeout_s else None
        excluded: set[str] = set()
        total: Usage | None = None
        try:
            request = await self._prepare(request)
        except OperationalError as e:
            return await self.request_finished(request, CompletionResult.failed(
                request.request_id, e, model=request.model, session_id=request.session_id, started_at=started_wall,
                submitted_at=submitted_at))
        number = 0
        while True:
            number += 1
            run = await self._attempts.run(request, number, excluded, deadline, history)
            if run.usage is not None:
                total = run.usage if total is None else total + run.usage
            error = run.error
            if error is None:
                attempt = Attempt(number, run.provider, latency_ms=run.latency_ms, ttft_ms=run.ttft_ms)
                history.append(attempt)
                await self._attempts.finished(request, attempt, None, run.call)
                response = run.response
                return await self.request_finished(request, CompletionResult(
                    request.request_id, "ok", text=response.message()["content"], model=response.model or request.model,
                    provider=run.provider, session_id=response.session_id or request.session_id,
                    usage=total or _NO_USAGE, attempts=tuple(history), started_at=started_wall, finished_at=time.time(),
                    message=response.message(), finish_reason=response.finish_reason, submitted_at=submitted_at,
                    logprobs=response.logprobs, system_fingerprint=response.system_fingerprint,
                ))
            decision = await self._attempts.decide(request, error, number, run, started, deadline, history, excluded)
            attempt = Attempt(number, run.provider, error.type, error.message,
                              decision.delay_s if decision.action == "retry" else None, run.latency_ms, run.ttft_ms)
            history.append(attempt)
            await self._attempts.finished(request, attempt, error, run.call)
            if decision.action == "give_up":
                return await self.request_finished(request, CompletionResult.failed(
                    request.request_id, decision.error or error, model=request.model, provider=run.provider,
                    session_id=request.session_id, usage=total or _NO_USAGE, attempts=tuple(history),
                    started_at=started_wall, finished_at=time.time(),
                    text="".join(run.assembly.text) if run.streamed else None,  # what the consumer received
                    submitted_at=submitted_at,
                ))
            if decision.switch_provider and run.provider is not None:
                excluded.add(run.provider)
            if decision.delay_s > 0:
                await self.sleep(decision.delay_s)

    async def _prepare(self, request: CompletionRequest) -> CompletionRequest:
        """``ksi_prepare_request``, each plugin given the request as the one before it left it. A request that
        continues its session needs a plugin that puts the session's earlier turns first (MissingPluginError)."""
        if request.continue_session and not self.hooks.implemented("ksi_prepare_request"):
            raise MissingPluginError("ksi_prepare_request", hookspecs.INSTALL_HINTS["ksi_prepare_request"])
        for impl in self.hooks.impls("ksi_prepare_request"):
            prepared = await self.hooks.call_impl(impl, "ksi_prepare_request", {"host": self, "request": request})
            if prepared is not None:
                if not isinstance(prepared, CompletionRequest) or prepared.request_id != request.request_id:
                    raise TypeError(f"plugin {impl.plugin!r}: ksi_prepare_request must return None or a CompletionRequest "
                                    f"with the same request_id, got {prepared!r}")
                request = prepared
        return request
