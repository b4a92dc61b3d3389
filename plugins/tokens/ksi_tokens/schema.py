"""The ledger table, its indexes and the statements that write it.

A row is inserted when a call is about to be sent (outcome ``sent``) and
completed, found by its ``call_id``, when the call ends. See ``README.md``."""

from __future__ import annotations

from typing import Any

from ksi_host.models import OUTCOME_SENT, OUTCOME_UNKNOWN, CompletionRequest, UpstreamCall

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
    # v3: one row per call that was sent, written before it is sent (outcome 'sent') and
    # completed by call_id when it ends. The token columns and latency_ms become nullable
    # (NULL: the upstream reported no usage, or the call has not ended / never ended as far
    # as the ledger knows); SQLite changes a column's constraint only by rebuilding the table.
    # Rows of v2 keep their values and have no call_id (NULL; a UNIQUE index allows many).
    # token_usage_call_id finds the row a call's ending completes (call ids are time-ordered, so
    # it grows at its end). token_usage_sent holds only the calls still 'sent' (a few: those in
    # flight), so a serving start-up finds the lost ones at once: at 1,000,000 rows, 0.3 ms with
    # it against 520 ms for the full scan without.
    f"""
    CREATE TABLE {TABLE}_v3 (
        id                  INTEGER PRIMARY KEY,
        call_id             TEXT,
        request_id          TEXT    NOT NULL,
        attempt             INTEGER NOT NULL,
        session_id          TEXT,
        agent_id            TEXT,
        originator_agent_id TEXT,
        purpose             TEXT,
        model               TEXT    NOT NULL,
        provider            TEXT    NOT NULL,
        prompt_tokens       INTEGER,
        completion_tokens   INTEGER,
        total_tokens        INTEGER,
        cost_usd            REAL,
        latency_ms          REAL,
        outcome             TEXT    NOT NULL,
        created_at          REAL    NOT NULL
    );
    INSERT INTO {TABLE}_v3 (id, call_id, request_id, attempt, session_id, agent_id, originator_agent_id, purpose,
                            model, provider, prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms,
                            outcome, created_at)
        SELECT id, NULL, request_id, attempt, session_id, agent_id, originator_agent_id, purpose,
               model, provider, prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms,
               outcome, created_at FROM {TABLE};
    DROP TABLE {TABLE};
    ALTER TABLE {TABLE}_v3 RENAME TO {TABLE};
    CREATE INDEX token_usage_created_at ON {TABLE} (created_at);
    CREATE UNIQUE INDEX token_usage_call_id ON {TABLE} (call_id);
    CREATE INDEX token_usage_sent ON {TABLE} (created_at) WHERE outcome = 'sent';
    """,
    # v4: the calls of one request, for ksi_request_details (ksi-host show): without it, a full scan (a
    # million rows: hundreds of ms); with it, a few rows read (benchmarks/logs_scale.py).
    f"""
    CREATE INDEX token_usage_request ON {TABLE} (request_id);
    """,
    # v5: the parts of the usage a provider may report besides the counts (issue 17): prompt tokens
    # served from its cache and completion tokens spent reasoning; NULL where it reported none.
    f"""
    ALTER TABLE {TABLE} ADD COLUMN cached_tokens INTEGER;
    ALTER TABLE {TABLE} ADD COLUMN reasoning_tokens INTEGER;
    """,
]

INDEXES = ("token_usage_created_at", "token_usage_call_id", "token_usage_sent", "token_usage_request")

CALLS_OF_REQUEST = f"SELECT * FROM {TABLE} WHERE request_id = ? ORDER BY id"
"""Every column of the rows of one request, in the order the calls were sent."""

# Constant strings: the host's group commit turns concurrent statements with the same SQL
# into a single executemany inside one transaction (the inserts of many requests' calls go
# together, and so do their completions).
INSERT_SENT = (
    f"INSERT INTO {TABLE} (call_id, request_id, attempt, session_id, agent_id, originator_agent_id, purpose, model,"
    " provider, outcome, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# How a call ended. An upsert, not an UPDATE: a call whose start was not recorded (announced
# to another plugin only, or a hook caller that skipped ksi_attempt_started) still gets its row.
# It sets the outcome whatever the row holds, so a row that a start-up took for a dead
# process's (``unknown``) gets its true ending if its process was alive after all.
RECORD_END = (
    f"INSERT INTO {TABLE} (call_id, request_id, attempt, session_id, agent_id, originator_agent_id, purpose, model,"
    " provider, prompt_tokens, completion_tokens, total_tokens, cost_usd, cached_tokens, reasoning_tokens, latency_ms,"
    " outcome, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (call_id) DO UPDATE SET prompt_tokens = excluded.prompt_tokens,"
    " completion_tokens = excluded.completion_tokens, total_tokens = excluded.total_tokens,"
    " cost_usd = excluded.cost_usd, cached_tokens = excluded.cached_tokens, reasoning_tokens = excluded.reasoning_tokens,"
    " latency_ms = excluded.latency_ms, outcome = excluded.outcome"
)

# At the start of a serving host: calls still 'sent' from before it started were sent by a
# process that is gone (one serving process per database file), and nobody saw how they ended.
MARK_UNKNOWN = f"UPDATE {TABLE} SET outcome = '{OUTCOME_UNKNOWN}' WHERE outcome = '{OUTCOME_SENT}' AND created_at < ?"


def _request_part(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    return (call.call_id, call.request_id, call.attempt, request.session_id, request.agent_id,
            request.originator_agent_id, request.purpose, call.model, call.provider)


def sent_row(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT_SENT`: the call as it is about to be sent, no tokens yet."""
    return (*_request_part(request, call), OUTCOME_SENT, float(call.created_at))


def end_row(request: CompletionRequest, call: UpstreamCall) -> tuple[Any, ...]:
    """The parameters of :data:`RECORD_END` for a call that ended.

    The token counts are stored exactly as the provider reported them, so the
    ledger's sums equal the requests' ``usage`` call for call; NULL when it
    reported none (unknown is not zero). ``cost_usd`` stays NULL when unknown.
    """
    u = call.usage
    if u is None:
        tokens: tuple[Any, ...] = (None, None, None, None, None, None)
    else:
        tokens = (u.prompt_tokens, u.completion_tokens, u.total_tokens, None if u.cost_usd is None else float(u.cost_usd),
                  u.cached_tokens, u.reasoning_tokens)
    latency = None if call.latency_ms is None else float(call.latency_ms)
    return (*_request_part(request, call), *tokens, latency, call.outcome, float(call.created_at))
