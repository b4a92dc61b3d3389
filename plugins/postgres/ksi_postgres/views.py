"""What ``ksi-host status``, ``show`` and ``logs`` read: the whole database, every host's requests."""

from __future__ import annotations

from typing import Any

from ksi_host.models import RequestQuery, iso

from . import rows, schema
from .ledger import Ledger
from .queue import PgQueue


def host_state(row: Any) -> str:
    """``alive`` (heartbeat within its lease), ``lost`` (no heartbeat for longer: killed or cut off), ``stopped``."""
    if row["stopped_at"] is not None:
        return "stopped"
    return "alive" if row["heartbeat_at"] + row["lease_s"] >= row["now"] else "lost"


async def status(q: PgQueue) -> dict[str, Any]:
    per = await q.pg.fetch(schema.SELECT_STATUS)
    hosts = await q.pg.fetch(schema.SELECT_HOSTS)
    now = per[0]["now"] if per else await q.pg.fetchval(schema.NOW)

    def wait(created: float | None) -> float | None:
        return None if created is None else round(max(0.0, now - created), 3)

    oldest = min((r["oldest"] for r in per if r["oldest"] is not None), default=None)
    queue = {
        "queued": sum(r["queued"] for r in per),
        "running": sum(r["running"] for r in per),
        "sessions": sum(1 for r in per if r["session_id"] is not None),
        "oldest_wait_s": wait(oldest),
        "concurrency": q.limit if q.serve else None,
        "in_flight": sum(r["running"] for r in per),
        "hosts_alive": sum(1 for h in hosts if host_state(h) == "alive"),
        "this_host": q.host_id,
        "model_limits": dict(q.model_limits),
        "by_session": [
            {"session_id": r["session_id"], "queued": r["queued"], "running": r["running"], "oldest_wait_s": wait(r["oldest"])}
            for r in sorted(per, key=lambda r: (r["session_id"] is not None, r["session_id"] or ""))
        ],
    }
    return {"queue": queue, "hosts": [{
        "host_id": h["host_id"], "hostname": h["hostname"], "pid": h["pid"], "state": host_state(h),
        "in_flight": h["in_flight"] if h["stopped_at"] is None else 0, "concurrency": h["concurrency"],
        "heartbeat_age_s": round(max(0.0, h["now"] - h["heartbeat_at"]), 3), "lease_s": h["lease_s"],
        "started_at": iso(h["started_at"]), "this": h["host_id"] == q.host_id,
    } for h in hosts]}


SELECT_DETAILS = (
    f"SELECT {schema.REQUEST_COLUMNS}, r.status, r.created_at, r.lease_owner, r.lease_epoch, r.lease_expires_at,"
    " r.cancel_requested, ksi_pg_now() AS now FROM ksi_pg_requests r JOIN ksi_pg_payloads p ON p.seq = r.seq"
    " WHERE r.request_id = $1"
)


async def details(q: PgQueue, ledger: Ledger, request_id: str) -> dict[str, Any] | None:
    row = await q.pg.fetchrow(SELECT_DETAILS, request_id)
    calls = await ledger.calls(request_id)
    if row is None:
        return {"calls": calls} if calls else None
    result = (await q.results([row["seq"]])).get(row["seq"])
    lease = None
    if row["status"] == "running":
        lease = {"owner": row["lease_owner"], "epoch": row["lease_epoch"],
                 "expires_in_s": round(row["lease_expires_at"] - row["now"], 3), "cancel_requested": row["cancel_requested"]}
    return {
        "request": rows.request_from_row(row).to_dict(),
        "state": row["status"],
        "submitted_at": iso(row["created_at"]),
        "result": None if result is None else result.to_dict(),
        "lease": lease,
        "calls": calls,
    }


async def list_requests(q: PgQueue, query: RequestQuery) -> list[dict[str, Any]]:
    where, params = [], []
    for name in ("session_id", "agent_id", "model", "status"):
        value = getattr(query, name)
        if value is not None:
            params.append(value)
            where.append(f"r.{name} = ${len(params)}")
    if query.since is not None:
        params.append(float(query.since))
        where.append(f"r.created_at >= ${len(params)}")
    params.append(query.limit)
    sql = (
        "SELECT r.request_id, r.session_id, r.agent_id, r.model, r.status, r.total_tokens, r.cost_usd, r.created_at,"
        " r.finished_at, (SELECT count(*) FROM ksi_pg_attempts a WHERE a.seq = r.seq) AS attempts"
        f" FROM ksi_pg_requests r {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY r.seq DESC LIMIT ${len(params)}"
    )
    return [{
        "request_id": r["request_id"], "session_id": r["session_id"], "agent_id": r["agent_id"], "model": r["model"],
        "status": r["status"], "attempts": r["attempts"], "total_tokens": r["total_tokens"], "cost_usd": r["cost_usd"],
        "latency_ms": None if r["finished_at"] is None else round((r["finished_at"] - r["created_at"]) * 1000, 3),
        "submitted_at": r["created_at"],
    } for r in await q.pg.fetch(sql, *params)]
