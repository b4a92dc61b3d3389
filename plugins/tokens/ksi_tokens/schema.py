"""The ledger table, its indexes and the one statement that writes a row."""

from __future__ import annotations

from typing import Any

from ksi_host.models import CompletionRequest, UpstreamCall

OWNER = "tokens"
"""The name the migrations are recorded under in ``ksi_schema_versions``."""

TABLE = "token_usage"

# Never edit a released migration: append a new one.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE {TABLE} (
        id                  INTEGER PRIMARY KEY,
        request_id          TEXT    NOT NULL,
        attempt             INTEGER NOT NULL,
        session_id          TEXT,
        agent_id            TEXT,
        originator_agent_id TEXT,
        purpose             TEXT,
        model               TEXT    NOT NULL,
        provider            TEXT    NOT NULL,
        prompt_tokens       INTEGER NOT NULL,
        completion_tokens   INTEGER NOT NULL,
        total_tokens        INTEGER NOT NULL,
        cost_usd            REAL,
        latency_ms          REAL    NOT NULL,
        outcome             TEXT    NOT NULL,
        created_at          REAL    NOT NULL
    );
    CREATE INDEX token_usage_created_at ON {TABLE} (created_at);
    CREATE INDEX token_usage_request ON {TABLE} (request_id, attempt);
    CREATE INDEX token_usage_model ON {TABLE} (model, created_at);
    CREATE INDEX token_usage_agent ON {TABLE} (agent_id, created_at);
    CREATE INDEX token_usage_session ON {TABLE} (session_id, created_at);
    CREATE INDEX token_usage_purpose ON {TABLE} (purpose, created_at);
    CREATE INDEX token_usage_provider ON {TABLE} (provider, created_at);
    """,
    # v2: only created_at stays indexed. Every report is one pass over the rows in
    # its time range; SQLite used the per-column indexes only to make `since`
    # reports slower (it walked a grouping index instead of the time range), and
    # nothing looks calls up by request. Each insert updated all seven.
    """
    DROP INDEX IF EXISTS token_usage_request;
    DROP INDEX IF EXISTS token_usage_model;
    DROP INDEX IF EXISTS token_usage_agent;
    DROP INDEX IF EXISTS token_usage_session;
    DROP INDEX IF EXISTS token_usage_purpose;
    DROP INDEX IF EXISTS token_usage_provider;
    """,
]

INDEXES = ("token_usage_created_at",)

# One constant string: the host's group commit turns concurrent inserts with
# the same SQL into a single executemany inside one transaction.
INSERT = (
    f"INSERT INTO {TABLE} (request_id, attempt, session_id, agent_id, originator_agent_id, purpose, model, provider,"
    " prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms, outcome, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def row(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT` for one upstream call.

    The token counts are stored exactly as the provider reported them, so the
    ledger's sums equal the requests' ``usage`` call for call. ``cost_usd``
    stays None (NULL) when unknown: an unknown cost is not a zero cost.
    """
    u = call.usage
    return (
        call.request_id,
        call.attempt,
        request.session_id,
        request.agent_id,
        request.originator_agent_id,
        request.purpose,
        call.model,
        call.provider,
        u.prompt_tokens,
        u.completion_tokens,
        u.total_tokens,
        None if u.cost_usd is None else float(u.cost_usd),
        float(call.latency_ms),
        call.outcome,
        float(call.created_at),
    )
