"""The usage reports: one SQL query per grouping, rows turned into dicts."""

from __future__ import annotations

from typing import Any

from ksi_host.errors import ValidationError
from ksi_host.models import OUTCOME_SENT, OUTCOME_UNKNOWN

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

REPORT_KEYS = ("key", "calls", "requests", "unknown_calls", "in_flight_calls", "prompt_tokens", "completion_tokens",
               "total_tokens", "cost_usd", "unpriced_calls", "cached_tokens", "reasoning_tokens")

# Every call sent is a row. Token columns are NULL where the upstream reported no usage: their sums
# are the tokens reported (0 when none was), and equal the results' usage sums. unknown_calls: the
# ledger does not know how they ended ('unknown', or still 'sent': in flight, or sent by a process
# that stopped, until a serving host starts); in_flight_calls: the 'sent' ones among them.
# unpriced_calls: calls that reported usage without a cost (cost_usd is then a lower bound).
_COLUMNS = (
    "COUNT(*) AS calls, COUNT(DISTINCT request_id) AS requests,"
    f" COALESCE(SUM(outcome IN ('{OUTCOME_UNKNOWN}', '{OUTCOME_SENT}')), 0) AS unknown_calls,"
    f" COALESCE(SUM(outcome = '{OUTCOME_SENT}'), 0) AS in_flight_calls,"
    " COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
    " COALESCE(SUM(total_tokens), 0) AS total_tokens, SUM(cost_usd) AS cost_usd,"
    " COUNT(total_tokens) - COUNT(cost_usd) AS unpriced_calls,"
    " SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens"  # NULL: no call reported any
)
_SELECT = "SELECT {key} AS key, " + _COLUMNS + f" FROM {TABLE}"

STATUS = "SELECT " + _COLUMNS + f" FROM {TABLE}"
"""The ``usage`` section of ``ksi_status``: the same sums over the whole ledger."""

STATUS_KEYS = ("calls", "unknown_calls", "in_flight_calls", "prompt_tokens", "completion_tokens", "total_tokens",
               "cost_usd")


def check(by: Any, since: Any) -> None:
    """Raise ValidationError for an unknown ``by`` or a ``since`` that is not unix seconds."""
    if by not in GROUPINGS:
        raise ValidationError("by", f"must be one of {', '.join(GROUPINGS)}; got {by!r}")
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


def status(row: Any) -> dict[str, Any]:
    """The row of :data:`STATUS` as the ``usage`` status section."""
    return {k: row[k] for k in STATUS_KEYS}
