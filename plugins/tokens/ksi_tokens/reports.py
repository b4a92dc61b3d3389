"""The usage reports: one SQL query per grouping, rows turned into dicts."""

from __future__ import annotations

from typing import Any

from ksi_host.errors import ValidationError

from .schema import TABLE

GROUPINGS: dict[str, str] = {
    "model": "model",
    "agent": "agent_id",
    "session": "session_id",
    "purpose": "purpose",
    "provider": "provider",
    "day": "date(created_at, 'unixepoch')",  # YYYY-MM-DD, UTC
    "total": "NULL",  # one row for everything: the total a table of groups cannot sum (requests)
}
"""``by`` value -> the SQL expression of the group key. Only these strings ever reach SQL."""

REPORT_KEYS = ("key", "calls", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "unpriced_calls")

_SELECT = (
    "SELECT {key} AS key, COUNT(*) AS calls, COUNT(DISTINCT request_id) AS requests,"
    " SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
    " SUM(total_tokens) AS total_tokens, SUM(cost_usd) AS cost_usd, COUNT(*) - COUNT(cost_usd) AS unpriced_calls"
    f" FROM {TABLE}"
)


def check(by: Any, since: Any) -> None:
    """Raise ValidationError for an unknown ``by`` or a ``since`` that is not unix seconds."""
    if by not in GROUPINGS:
        raise ValidationError("by", f"must be one of {', '.join(g for g in GROUPINGS if g != 'total')}; got {by!r}")
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
        raise ValidationError("since", f"must be unix seconds (a number) or null; got {since!r}")


def query(by: str, since: float | None) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of the report grouped ``by`` (checked with :func:`check`)."""
    sql = _SELECT.format(key=GROUPINGS[by])
    params: tuple[Any, ...] = ()
    if since is not None:
        sql += " WHERE created_at >= ?"
        params = (float(since),)
    if by == "total":
        return sql, params
    sql += " GROUP BY 1"
    if by == "day":
        sql += " ORDER BY key"
    else:
        sql += " ORDER BY total_tokens DESC, key IS NULL, key"
    return sql, params


def to_dicts(rows: list[Any], by: str) -> list[dict[str, Any]]:
    """Rows of :func:`query` as report dicts (a total over no calls is an empty list)."""
    out = []
    for r in rows:
        if by == "total" and r["calls"] == 0:
            continue
        d = {k: r[k] for k in REPORT_KEYS}
        out.append(d)
    return out
