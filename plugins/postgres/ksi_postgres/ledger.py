"""The usage ledger in PostgreSQL: one row per upstream call, written before it is sent, completed when it ends.

The rows and reports are those of ksi-tokens (see its README), in ``ksi_pg_token_usage``, with one more
column: ``host_id``, the host that sent the call. A call left ``sent`` by a host that stopped renewing its
heartbeat (killed, cut off) becomes ``unknown``: when another host takes its request over (in the same
transaction) and when any host sees that host's heartbeat older than its lease.
"""

from __future__ import annotations

from typing import Any

from ksi_host.errors import ValidationError
from ksi_host.models import OUTCOME_SENT, OUTCOME_UNKNOWN, CompletionRequest, UpstreamCall

from . import schema
from .db import Batcher, Pg, columns

GROUPINGS: dict[str, str] = {
    "model": "model",
    "agent": "agent_id",
    "session": "session_id",
    "purpose": "purpose",
    "provider": "provider",
    "day": "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "total": "NULL",
}
"""``by`` -> the SQL expression of the group key (only these strings reach SQL)."""

REPORT_KEYS = ("key", "calls", "requests", "unknown_calls", "in_flight_calls", "prompt_tokens", "completion_tokens",
               "total_tokens", "cost_usd", "unpriced_calls")
STATUS_KEYS = ("calls", "unknown_calls", "in_flight_calls", "prompt_tokens", "completion_tokens", "total_tokens",
               "cost_usd")
_COLUMNS = (
    "count(*) AS calls, count(DISTINCT request_id) AS requests,"
    f" count(*) FILTER (WHERE outcome IN ('{OUTCOME_UNKNOWN}', '{OUTCOME_SENT}')) AS unknown_calls,"
    f" count(*) FILTER (WHERE outcome = '{OUTCOME_SENT}') AS in_flight_calls,"
    " COALESCE(sum(prompt_tokens), 0)::bigint AS prompt_tokens, COALESCE(sum(completion_tokens), 0)::bigint AS completion_tokens,"
    " COALESCE(sum(total_tokens), 0)::bigint AS total_tokens, sum(cost_usd) AS cost_usd,"
    " count(total_tokens) - count(cost_usd) AS unpriced_calls"
)
STATUS = f"SELECT {_COLUMNS} FROM {schema.LEDGER}"


def check(by: Any, since: Any) -> None:
    if by not in GROUPINGS:
        raise ValidationError("by", f"must be one of {', '.join(GROUPINGS)}; got {by!r}")
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
        raise ValidationError("since", f"must be unix seconds (a number) or null; got {since!r}")


def query(by: str, since: float | None) -> tuple[str, tuple[Any, ...]]:
    sql = f"SELECT {GROUPINGS[by]} AS key, {_COLUMNS} FROM {schema.LEDGER}"
    params: tuple[Any, ...] = ()
    if since is not None:
        sql += " WHERE created_at >= $1"
        params = (float(since),)
    if by == "total":
        return sql, params
    sql += " GROUP BY 1"
    sql += " ORDER BY key" if by == "day" else " ORDER BY total_tokens DESC, key NULLS LAST"
    return sql, params


def _request_part(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    return (call.call_id, call.request_id, call.attempt, request.session_id, request.agent_id,
            request.originator_agent_id, request.purpose, call.model, call.provider)


def sent_row(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    """schema.SENT_TYPES values: the call about to be sent."""
    return (*_request_part(request, call), float(call.created_at))


def end_row(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    """schema.END_TYPES values: how the call ended (tokens NULL when the upstream reported none)."""
    u = call.usage
    tokens = (None, None, None, None) if u is None else (
        u.prompt_tokens, u.completion_tokens, u.total_tokens, None if u.cost_usd is None else float(u.cost_usd))
    latency = None if call.latency_ms is None else float(call.latency_ms)
    return (*_request_part(request, call), float(call.created_at), *tokens, latency, call.outcome)


class Ledger:
    """The ledger's writes (group-committed) and reads for one host. ``host_id`` is written with every row."""

    def __init__(self, pg: Pg, host_id: str | None) -> None:
        self.pg = pg
        self.host_id = host_id
        self.sent = Batcher(self._write_sent)
        self.ended = Batcher(self._write_ended)

    async def _write_sent(self, rows: list[tuple[Any, ...]]) -> list[None]:
        await self.pg.execute(schema.INSERT_SENT, self.host_id, *columns(rows, len(schema.SENT_TYPES)))
        return [None] * len(rows)

    async def _write_ended(self, rows: list[tuple[Any, ...]]) -> list[None]:
        await self.pg.execute(schema.RECORD_END, self.host_id, *columns(rows, len(schema.END_TYPES)))
        return [None] * len(rows)

    async def drain(self) -> None:
        await self.sent.drain()
        await self.ended.drain()

    async def report(self, by: str, since: float | None) -> list[dict[str, Any]]:
        check(by, since)
        sql, params = query(by, since)
        out = []
        for r in await self.pg.fetch(sql, *params):
            if by == "total" and r["calls"] == 0:
                continue
            out.append({k: r[k] for k in REPORT_KEYS})
        return out

    async def status(self) -> dict[str, Any]:
        row = await self.pg.fetchrow(STATUS)
        return {k: row[k] for k in STATUS_KEYS}

    async def calls(self, request_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pg.fetch(schema.SELECT_CALLS, request_id)]
