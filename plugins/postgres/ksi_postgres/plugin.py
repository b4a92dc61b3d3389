"""The ksi-postgres plugin: the queue and the usage ledger on PostgreSQL, shared by any number of hosts.

Configured (``[postgres] dsn_env = "KSI_PG_DSN"``), it claims the queue's and the ledger's hooks
(``ksi_exclusive_hooks``), so ksi-queue and ksi-tokens, if installed, are not started, and offers ksi-limits
its rate windows shared by every host (``ksi_window_store``: :mod:`ksi_postgres.windows`). Installed but not
configured, it answers nothing and changes nothing. See the README.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ksi_host
from ksi_host.errors import MissingPluginError, StartupError
from ksi_host.models import CompletionRequest, RequestQuery, Ticket, UpstreamCall

from . import schema
from .config import PostgresConfig
from .db import Pg
from .ledger import Ledger, end_row, sent_row
from .queue import PgQueue
from .views import details, list_requests, status
from .windows import PgWindowStore

TABLE = "postgres"

CLAIMED_HOOKS = [
    "ksi_enqueue", "ksi_cancel", "ksi_clear_session", "ksi_drain", "ksi_request_details", "ksi_list_requests",
    "ksi_attempt_started", "ksi_record_usage", "ksi_usage_report",
]
"""The hooks of a queue and of a ledger: served by this plugin alone while it is configured."""


class Plugin:
    """See the module docstring."""

    def __init__(self) -> None:
        self.pg: Pg | None = None
        self.queue: PgQueue | None = None
        self.ledger: Ledger | None = None
        self.windows: PgWindowStore | None = None

    @ksi_host.hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return (TABLE, PostgresConfig)

    @ksi_host.hookimpl
    def ksi_exclusive_hooks(self, host: Any) -> list[str] | None:
        return list(CLAIMED_HOOKS) if host.config[TABLE].configured else None

    @ksi_host.hookimpl
    def ksi_window_store(self, host: Any) -> PgWindowStore | None:
        """The rate windows of every host on the database (ksi-limits asks at its start-up, maybe before ours)."""
        cfg: PostgresConfig = host.config[TABLE]
        if not cfg.configured:
            return None
        if self.windows is None:
            self.windows = PgWindowStore(cfg.window_poll_s)
        return self.windows

    @ksi_host.hookimpl
    async def ksi_startup(self, host: Any) -> None:
        cfg: PostgresConfig = host.config[TABLE]
        if not cfg.configured:
            return
        assert cfg.dsn_env is not None
        if host.serve and not host.resume:
            raise StartupError("ksi-postgres: a host that serves only its own requests (Host(resume=False), as "
                               "ksi-host ask) cannot serve a shared queue, whose hosts run every host's requests: "
                               "use a config without [postgres]")
        dsn = os.environ.get(cfg.dsn_env)
        if not dsn:
            raise StartupError(f"config key {TABLE}.dsn_env: the environment variable {cfg.dsn_env} is not set "
                               "(it holds the PostgreSQL DSN, e.g. postgresql://user:password@host:5432/dbname)")
        limit = host.concurrency if host.concurrency is not None else cfg.concurrency
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise StartupError(f"config key host.concurrency: must be a positive integer, got {limit!r}")
        pg = await Pg(dsn, size=cfg.pool_size).open()
        self.pg = pg
        try:
            await pg.migrate(schema.OWNER, schema.MIGRATIONS)
            queue = PgQueue(host, pg, serve=host.serve, limit=limit, lease_s=cfg.lease_s, poll_s=cfg.poll_s,
                            model_limits=cfg.model_limits, stop_grace_s=cfg.stop_grace_s)
            self.ledger = Ledger(pg, queue.host_id)
            await queue.start()
            self.queue = queue
            if self.windows is None:
                self.windows = PgWindowStore(cfg.window_poll_s)
            self.windows.bind(pg, queue.host_id)
        except BaseException:
            await pg.close()
            self.pg = None
            raise

    @ksi_host.hookimpl
    async def ksi_drain(self, host: Any) -> None:
        if self.queue is not None:
            await self.queue.drain()

    @ksi_host.hookimpl
    async def ksi_shutdown(self, host: Any) -> None:
        if self.pg is None:
            return
        try:
            if self.queue is not None:
                await self.queue.stop()
            for _ in range(3):  # attempts cut short by the stop report their calls from tasks: let them start
                await asyncio.sleep(0)
            if self.ledger is not None:
                await self.ledger.drain()
            if self.queue is not None:
                await self.queue.mark_stopped()
        finally:
            pg, self.pg = self.pg, None
            self.queue = None
            if self.windows is not None:
                self.windows.close()
            self.ledger = None  # a call cut short that reports later stays 'sent'; the other hosts settle it as unknown
            await pg.close()

    # -- the queue ----------------------------------------------------------------------------------

    @ksi_host.hookimpl(trylast=True)
    async def ksi_enqueue(self, host: Any, request: CompletionRequest) -> Ticket:
        if self.queue is None:
            raise MissingPluginError("ksi_enqueue", "ksi-queue (or configure [postgres] dsn_env for ksi-postgres)")
        return await self.queue.enqueue(request)

    @ksi_host.hookimpl(trylast=True)
    async def ksi_cancel(self, host: Any, request_id: str) -> bool | None:
        return None if self.queue is None else await self.queue.cancel(request_id)

    @ksi_host.hookimpl(trylast=True)
    async def ksi_clear_session(self, host: Any, session_id: str) -> int | None:
        return None if self.queue is None else await self.queue.clear_session(session_id)

    @ksi_host.hookimpl
    async def ksi_request_details(self, host: Any, request_id: str) -> dict[str, Any] | None:
        if self.queue is None or self.ledger is None:
            return None
        return await details(self.queue, self.ledger, request_id)

    @ksi_host.hookimpl(trylast=True)
    async def ksi_list_requests(self, host: Any, query: RequestQuery) -> list[dict[str, Any]] | None:
        return None if self.queue is None else await list_requests(self.queue, query)

    @ksi_host.hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any] | None:
        if self.queue is None or self.ledger is None:
            return None
        sections = await status(self.queue)
        sections["usage"] = await self.ledger.status()
        return sections

    # -- the ledger ---------------------------------------------------------------------------------

    @ksi_host.hookimpl
    def ksi_attempt_started(self, host: Any, request: CompletionRequest, call: UpstreamCall) -> Any:
        # The host awaits the future: the row is committed (group commit) before the call is sent.
        if self.ledger is None:
            return None
        return self.ledger.sent.add(sent_row(request, call))

    @ksi_host.hookimpl
    def ksi_record_usage(self, host: Any, request: CompletionRequest, call: UpstreamCall) -> Any:
        if self.ledger is None:  # (a call cut short after this host stopped: its row is settled as unknown)
            return None
        return self.ledger.ended.add(end_row(request, call))

    @ksi_host.hookimpl(trylast=True)
    async def ksi_usage_report(self, host: Any, by: str, since: float | None) -> list[dict[str, Any]] | None:
        if self.ledger is None:
            return None
        return await self.ledger.report(by, since)
