"""The ksi-tokens plugin: the usage ledger's hookimpls."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import ksi_host
from ksi_host.models import CompletionRequest, UpstreamCall

from . import reports, schema


class Plugin:
    """Records every upstream call that reported usage; reports on the ledger."""

    @ksi_host.hookimpl
    async def ksi_startup(self, host: Any) -> None:
        await host.db.migrate(schema.OWNER, schema.MIGRATIONS)

    @ksi_host.hookimpl
    def ksi_record_usage(self, host: Any, request: CompletionRequest, call: UpstreamCall) -> Awaitable[None] | None:
        if call.usage is None:  # the ledger holds calls that reported usage
            return None
        # One group-committed statement. The host awaits the future this returns: it completes
        # once the row's transaction is committed, so the row is durable before the request's
        # result is final. (Returned, not awaited here: no coroutine of our own per call.)
        return host.db.execute(schema.INSERT, schema.row(request, call))

    @ksi_host.hookimpl
    async def ksi_usage_report(self, host: Any, by: str, since: float | None) -> list[dict[str, Any]]:
        reports.check(by, since)
        sql, params = reports.query(by, since)
        return reports.to_dicts(await host.db.fetchall(sql, params), by)

    @ksi_host.hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any]:
        r = await host.db.fetchone(
            f"SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
            f" COALESCE(SUM(total_tokens), 0), SUM(cost_usd) FROM {schema.TABLE}"
        )
        return {"usage": {"calls": r[0], "prompt_tokens": r[1], "completion_tokens": r[2],
                          "total_tokens": r[3], "cost_usd": r[4]}}
