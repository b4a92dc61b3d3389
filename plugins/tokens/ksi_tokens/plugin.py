"""The ksi-tokens plugin: the usage ledger's hookimpls."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

import ksi_host
from ksi_host.models import CompletionRequest, UpstreamCall

from . import reports, schema

log = logging.getLogger("ksi_host.tokens")


class Plugin:
    """One ledger row per upstream call, written before the call is sent; reports on the ledger."""

    @ksi_host.hookimpl
    async def ksi_startup(self, host: Any) -> None:
        started = time.time()
        await host.db.migrate(schema.OWNER, schema.MIGRATIONS)
        if host.serve:
            # One serving process per database file (ksi-queue refuses a second one): a row still
            # 'sent' from before this start belongs to a process that is gone. Read-only hosts
            # (ksi-host usage, status) never do this: the serving host may be running.
            n = await host.db.write_batch([(schema.MARK_UNKNOWN, (started,))], count=True)
            if n:
                log.warning("ksi-tokens: %d upstream call(s) sent by a process that stopped before they ended are "
                            "recorded with outcome 'unknown' (they may have been answered and billed)", n)

    @ksi_host.hookimpl
    def ksi_attempt_started(self, host: Any, request: CompletionRequest, call: UpstreamCall) -> Awaitable[None]:
        # One group-committed statement; the host awaits the future this returns, so the row is
        # durable before the call is sent. (Returned, not awaited here: no coroutine per call.)
        return host.db.execute(schema.INSERT_SENT, schema.sent_row(request, call))

    @ksi_host.hookimpl
    def ksi_record_usage(self, host: Any, request: CompletionRequest, call: UpstreamCall) -> Awaitable[None]:
        # Completes the call's row (by call_id), with or without usage: every call sent has one row.
        # Durable before the request's result is final, as above.
        return host.db.execute(schema.RECORD_END, schema.end_row(request, call))

    @ksi_host.hookimpl
    async def ksi_usage_report(self, host: Any, by: str, since: float | None) -> list[dict[str, Any]]:
        reports.check(by, since)
        sql, params = reports.query(by, since)
        return reports.to_dicts(await host.db.fetchall(sql, params), by)

    @ksi_host.hookimpl
    async def ksi_request_details(self, host: Any, request_id: str) -> dict[str, Any] | None:
        """``calls``: the ledger's rows of the request, every column, in the order they were sent; None when
        it made no call."""
        rows = await host.db.fetchall(schema.CALLS_OF_REQUEST, (request_id,))
        return {"calls": [dict(row) for row in rows]} if rows else None

    @ksi_host.hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any]:
        return {"usage": reports.status(await host.db.fetchone(reports.STATUS))}
