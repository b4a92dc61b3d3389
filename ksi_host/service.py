"""The orchestrator: a thin layer that only sequences hooks.

``async with Host(config, db_path) as host:`` loads plugins, validates the
config, opens the database and starts the plugins. ``await host.submit(r)``
hands a request to the queue (``ksi_enqueue``) and returns a ticket;
``await host.complete(r)`` waits for the result. When the queue runs a request
it calls :meth:`Host.execute`: select a provider, call it, on an
OperationalError ask ``ksi_handle_failure``, record usage, return the result.
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
from .config import HOST_TABLE, build_config, load_config
from .db import Database, default_db_path
from .errors import DeadlineExceeded, MissingPluginError, NoProviderError, OperationalError, StartupError, ValidationError
from .hooks import HookCaller
from .models import (
    Attempt,
    AttemptContext,
    CompletionRequest,
    CompletionResult,
    FailureDecision,
    ProviderInfo,
    Ticket,
    UpstreamCall,
    Usage,
)
from .plugins import PluginInfo, instantiate, load_plugins

log = logging.getLogger("ksi_host")
_NO_EXCLUDE: frozenset[str] = frozenset()
_NO_USAGE = Usage()


class Host:
    """The KSI host. See the module docstring.

    ``config``: a dict of tables, a path to a TOML file, or None (then
    ``KSI_HOST_CONFIG`` if set). ``db_path``: the database file (None:
    ``KSI_HOST_DB`` or ``ksi-host.db``). ``plugins``: plugin objects to use
    instead of entry points (classes are instantiated). ``serve``: False for
    read-only use (no queued work is run). ``clock``/``sleep``: injectable time.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        db_path: str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[Any] | None = None,
        serve: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if config is None:
            config = os.environ.get("KSI_HOST_CONFIG")
        self._raw_config = dict(config) if isinstance(config, Mapping) else load_config(config)
        self.db_path = str(db_path) if db_path is not None else default_db_path()
        self._explicit = list(plugins) if plugins is not None else None
        self.serve = serve
        self.clock = clock
        self.sleep = sleep
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.hooks = HookCaller(self.pm)
        self.plugins: list[PluginInfo] = []
        self.config: dict[str, Any] = {}
        self.db: Database | None = None
        self._started: list[str] = []

    # -- life cycle -------------------------------------------------------------

    async def __aenter__(self) -> Host:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _register(self) -> None:
        if self._explicit is None:
            found = load_plugins()
        else:
            found = [PluginInfo(getattr(p, "__name__", type(p).__name__), None, None, p) for p in self._explicit]
        for info in found:
            obj = instantiate(info.obj)
            name, n = info.name, 1
            while self.pm.has_plugin(name):
                n += 1
                name = f"{info.name}-{n}"
            self.pm.register(obj, name=name)
            self.plugins.append(PluginInfo(name, info.distribution, info.version, obj))
        self.hooks.reset()

    async def start(self) -> None:
        self._register()
        specs: dict[str, type] = {}
        for plugin, fn, _ in self.hooks.impls("ksi_config_spec"):
            spec = fn()
            if spec is not None:
                table, cls = spec
                if table in specs:
                    raise StartupError(f"config table [{table}] is declared by two plugins (second: {plugin})")
                specs[table] = cls
        self.config = build_config(self._raw_config, specs)
        logging.getLogger("ksi_host").setLevel(self.config[HOST_TABLE].log_level.upper())
        self.db = await Database(self.db_path, create=self.serve).open()
        try:
            for plugin, fn, argnames in reversed(self.hooks.impls("ksi_startup")):  # registration order
                await self._call_one(plugin, fn, argnames, "ksi_startup")
                self._started.append(plugin)
        except BaseException:
            await self.stop()
            raise

    async def _call_one(self, plugin: str, fn: Any, argnames: tuple[str, ...], hook: str) -> None:
        try:
            r = fn(*[{"host": self}[a] for a in argnames])
            if r is not None and hasattr(r, "__await__"):
                await r
        except Exception as e:
            if not isinstance(e, StartupError):
                e.add_note(f"raised by plugin {plugin!r} in hook {hook}")
            raise

    async def stop(self) -> None:
        try:
            for plugin, fn, argnames in self.hooks.impls("ksi_shutdown"):
                if plugin in self._started:  # newest first: reverse registration order
                    await self._call_one(plugin, fn, argnames, "ksi_shutdown")
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
        """``hooks.first(hook, ...)`` to await; MissingPluginError if no plugin implements ``hook``.
        (Not a coroutine itself: one level less on the per-request path.)"""
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

    # -- running one request (called by the queue) ------------------------------

    async def execute(self, request: CompletionRequest) -> CompletionResult:
        """Run ``request`` now: attempts, failure handling, usage. Never raises an
        OperationalError (it becomes an error result); programming errors propagate."""
        started_wall, started = time.time(), self.clock()
        deadline = started + request.timeout_s if request.timeout_s else None
        history: list[Attempt] = []
        excluded: set[str] = set()
        total: Usage | None = None
        number = 0
        while True:
            number += 1
            name: str | None = None
            t0 = self.clock()
            response = None
            try:
                provider = await self._need("ksi_select_provider", request=request,
                                            exclude=frozenset(excluded) if excluded else _NO_EXCLUDE)
                if provider is None:
                    raise await self._no_provider(request, excluded)
                name = provider.name
                timeout = provider.timeout_s
                if deadline is not None:
                    left = deadline - t0
                    if left <= 0:
                        raise DeadlineExceeded(f"the {request.timeout_s}s deadline passed before attempt {number}")
                    timeout = left if timeout is None else min(timeout, left)
                try:
                    response = await provider.complete(request, timeout_s=timeout)
                except OperationalError:
                    raise
                except Exception as e:
                    e.add_note(f"raised by provider {name!r} ({type(provider).__module__}) in Provider.complete")
                    raise
                error: OperationalError | None = None
            except OperationalError as e:
                error = e
            latency_ms = (self.clock() - t0) * 1000
            usage = response.usage if response is not None else getattr(error, "usage", None)
            if usage is not None and name is not None:
                total = usage if total is None else total + usage
                call = UpstreamCall(
                    request.request_id, number, name, request.model, usage, latency_ms, "ok" if error is None else error.type
                )
                await self.hooks.call("ksi_record_usage", host=self, request=request, call=call)
            if error is None:
                history.append(Attempt(number, name, latency_ms=latency_ms))
                return CompletionResult(
                    request.request_id, "ok", text=response.text, model=request.model, provider=name,
                    session_id=response.session_id or request.session_id, usage=total or _NO_USAGE, attempts=tuple(history),
                    started_at=started_wall, finished_at=time.time(),
                )
            decision = await self._decide(request, error, number, name, started, deadline, history, excluded)
            history.append(Attempt(number, name, error.type, error.message,
                                   decision.delay_s if decision.action == "retry" else None, latency_ms))
            if decision.action == "give_up":
                final = decision.error or error
                return CompletionResult.failed(
                    request.request_id, final, model=request.model, provider=name, session_id=request.session_id,
                    usage=total or _NO_USAGE, attempts=tuple(history), started_at=started_wall, finished_at=time.time(),
                )
            if decision.switch_provider and name is not None:
                excluded.add(name)
            if decision.delay_s > 0:
                await self.sleep(decision.delay_s)

    async def _decide(self, request: CompletionRequest, error: OperationalError, number: int, name: str | None,
                      started: float, deadline: float | None, history: list[Attempt], excluded: set[str]) -> FailureDecision:
        if isinstance(error, (MissingPluginError, NoProviderError, ValidationError)):
            return FailureDecision.give_up(error)
        if not self.hooks.implemented("ksi_handle_failure"):
            error.message += f" (not retried: {MissingPluginError('ksi_handle_failure', hookspecs.INSTALL_HINTS['ksi_handle_failure'])})"
            return FailureDecision.give_up(error)
        ctx = AttemptContext(number, name, started, self.clock(), deadline, tuple(history), frozenset(excluded))
        decision = await self.hooks.first("ksi_handle_failure", host=self, request=request, error=error, attempt=ctx)
        if decision is None:
            return FailureDecision.give_up(error)
        if decision.action == "retry" and deadline is not None and self.clock() + decision.delay_s >= deadline:
            return FailureDecision.give_up(DeadlineExceeded(
                f"gave up after {number} attempt(s): waiting {decision.delay_s:.2f}s more would pass the "
                f"{request.timeout_s}s deadline (last error {error.type}: {error.message})"))
        return decision

    async def _no_provider(self, request: CompletionRequest, excluded: set[str]) -> NoProviderError:
        if excluded:
            return NoProviderError(f"no provider left for model {request.model!r}: {', '.join(sorted(excluded))} failed")
        known = sorted({p.model for p in await self.providers(None)})
        return NoProviderError(f"no provider serves model {request.model!r} (configured models: {', '.join(known) or 'none'})")
