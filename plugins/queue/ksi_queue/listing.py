"""What the queue shows of its requests: ``ksi_request_details`` and ``ksi_list_requests`` (``ksi-host show``,
``ksi-host logs``). Reads only.

Lists run newest first (``created_at``, then ``seq``) from one index, read from its newest end: the time
index, or the index of the session, agent or model asked for (each with ``created_at``), or a partial index
of the rows with the status asked for, so a page of 20 costs about the same on a database of a million
requests as on an empty one (``benchmarks/logs_scale.py``). Filters beside it are checked on the rows it
gives (see :func:`list_sql`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ksi_host.db import Database
from ksi_host.models import CompletionResult, RequestQuery, iso

from . import schema
from .store import attempt_from_row, request_from_row, result_from_row

LIST_KEYS = ("request_id", "session_id", "agent_id", "model", "status", "attempts", "total_tokens", "cost_usd",
             "latency_ms", "submitted_at")
"""The keys of each request ``ksi_list_requests`` answers."""

_LIST_COLUMNS = (
    "r.request_id, r.session_id, r.agent_id, r.model, r.status, r.total_tokens, r.cost_usd, r.created_at, r.finished_at,"
    " (SELECT COUNT(*) FROM ksi_queue_attempts a WHERE a.request_id = r.request_id) AS attempts"
)
_DETAILS = (
    f"SELECT {schema.REQUEST_COLUMNS}, {schema.PAYLOAD_SELECT}, {schema.RESULT_COLUMNS} FROM ksi_queue_requests r"
    " JOIN ksi_queue_payloads p ON p.seq = r.seq WHERE r.request_id = ?"
)


def list_sql(query: RequestQuery, *, status: str | None, ids: Collection[str] = (), limit: int) -> tuple[str, list[Any]]:
    """The SELECT of one page of requests: those of ``query``'s session, agent, model and ``since``, with
    ``status`` (None: any), among ``ids`` if given, newest first, at most ``limit``.

    One index is read, the others' filters are checked on the rows it gives (``+column`` keeps SQLite from
    reading their index instead: without statistics it cannot tell which is smaller). The session's comes
    first (a session holds few requests); then, by status, the partial index of the failed rows (few) or of the
    unfinished ones (ordered by ``seq``, the submission order: the same as by time, but for a clock set back);
    else the agent's, the model's or the time index, as SQLite chooses."""
    if query.session_id is not None:
        lead = "session_id"
    elif status in ("error", "cancelled"):
        lead = "status"
    elif status in schema.UNFINISHED:
        lead = "unfinished"
    else:
        lead = None
    where: list[str] = []
    params: list[Any] = []
    for column in ("session_id", "agent_id", "model"):
        value = getattr(query, column)
        if value is not None:
            where.append(f"{'' if lead in (None, column) else '+'}r.{column} = ?")
            params.append(value)
    if status is not None:
        if lead == "unfinished":
            where.append("r.status IN ('queued', 'running')")  # (the partial index's own condition)
        where.append(f"{'' if lead in (None, 'status', 'unfinished') else '+'}r.status = ?")
        params.append(status)
    if query.since is not None:
        where.append("r.created_at >= ?")
        params.append(float(query.since))
    if ids:
        where.append(f"r.request_id IN ({', '.join('?' * len(ids))})")
        params.extend(ids)
    sql = f"SELECT {_LIST_COLUMNS} FROM ksi_queue_requests r"
    if lead == "unfinished":
        sql += " INDEXED BY ksi_queue_requests_unfinished"
    if where:
        sql += " WHERE " + " AND ".join(where)
    params.append(limit)
    order = "r.seq DESC" if lead == "unfinished" else "r.created_at DESC, r.seq DESC"
    return f"{sql} ORDER BY {order} LIMIT ?", params


async def page(db: Database, query: RequestQuery, *, status: str | None, ids: Collection[str] = (),
               limit: int | None = None) -> list[Any]:
    sql, params = list_sql(query, status=status, ids=ids, limit=query.limit if limit is None else limit)
    return await db.fetchall(sql, params)


def listed(row: Any, status: str) -> dict[str, Any]:
    """One request of a page as ``ksi_list_requests`` answers it (``status``: its state now)."""
    finished = row["finished_at"] if status in schema.FINAL else None
    return {
        "request_id": row["request_id"],
        "session_id": row["session_id"],
        "agent_id": row["agent_id"],
        "model": row["model"],
        "status": status,
        "attempts": row["attempts"],
        "total_tokens": row["total_tokens"],
        "cost_usd": row["cost_usd"],
        "latency_ms": None if finished is None else round((finished - row["created_at"]) * 1000, 3),
        "submitted_at": iso(row["created_at"]),
    }


async def details(db: Database, request_id: str) -> tuple[Any, CompletionResult | None] | None:
    """The row of ``request_id`` (request, payload and result columns) and its final result, or None if unknown."""
    row = await db.fetchone(_DETAILS, (request_id,))
    if row is None:
        return None
    if row["status"] not in schema.FINAL:
        return row, None
    attempts = [attempt_from_row(a) for a in await db.fetchall(schema.select_attempts(1), (request_id,))]
    return row, result_from_row(row, attempts)


def details_sections(row: Any, result: CompletionResult | None, state: str) -> dict[str, Any]:
    """The sections of ``ksi_request_details``: ``request``, ``state``, ``submitted_at``, ``result``."""
    return {
        "request": request_from_row(row).to_dict(),
        "state": state,
        "submitted_at": iso(row["created_at"]),
        "result": None if result is None else result.to_dict(),
    }
