"""The tables of ksi-postgres and the SQL that touches them.

Every table has real columns; JSON (the ``json`` type, stored as sent) only holds documents: a
request's messages, metadata, tool schemas and other structured chat parameters, and an answer's
assistant message. Migrations are numbered and recorded in ``ksi_pg_schema_versions`` (one row per
owner, like the SQLite ``ksi_schema_versions``); :func:`ksi_postgres.db.migrate` applies them under
an advisory lock, so hosts starting together apply each one once.

Time is the database's clock (``ksi_pg_now()``, unix seconds), for leases and heartbeats alike: hosts
whose clocks disagree still agree on when a lease ran out.
"""

from __future__ import annotations

OWNER = "ksi-postgres"
UNFINISHED = ("queued", "running")
FINAL = ("ok", "error", "cancelled")
MIGRATE_LOCK = 0x6B73_6970_6701  # pg_advisory_xact_lock key of migrations ("ksipg" + 1)
WORK_CHANNEL = "ksi_pg_work"
HOST_CHANNEL_PREFIX = "ksi_pg_host_"

# The chat-completions parameters (ksi_host.chat.PARAMETERS) and their column types in ksi_pg_payloads.
# A parameter whose value may be a structure (a list, an object) is a json document. A parameter the
# host adds later needs a migration (tests check that every one has a column).
PARAMETER_TYPES: dict[str, str] = {
    "max_tokens": "integer",
    "max_completion_tokens": "integer",
    "temperature": "double precision",
    "top_p": "double precision",
    "stop": "json",
    "seed": "bigint",
    "presence_penalty": "double precision",
    "frequency_penalty": "double precision",
    "logit_bias": "json",
    "logprobs": "boolean",
    "top_logprobs": "integer",
    "n": "integer",
    "user": "text",
    "tools": "json",
    "tool_choice": "json",
    "parallel_tool_calls": "boolean",
    "response_format": "json",
    "reasoning_effort": "text",
    "verbosity": "text",
    "service_tier": "text",
    "store": "boolean",
    "modalities": "json",
    "audio": "json",
    "prediction": "json",
    "web_search_options": "json",
    "prompt_cache_key": "text",
    "safety_identifier": "text",
}

PAYLOAD_COLUMNS: dict[str, str] = {
    "messages": "json", "metadata": "json", "provider_options": "json", "continue_session": "boolean", **PARAMETER_TYPES,
}
"""Columns of ksi_pg_payloads after ``seq``: what a request asks, written once when it is accepted."""

def q(name: str) -> str:
    """A column name quoted (``user`` is a reserved word)."""
    return f'"{name}"'


_PAYLOAD_DDL = ",\n".join(f"    {q(name)} {sqltype}{' NOT NULL' if name in ('messages', 'metadata', 'continue_session') else ''}"
                          for name, sqltype in PAYLOAD_COLUMNS.items())

MIGRATIONS: list[str] = [
    f"""
    CREATE FUNCTION ksi_pg_now() RETURNS double precision LANGUAGE sql VOLATILE
        AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;

    CREATE TABLE ksi_pg_hosts (
        host_id      text PRIMARY KEY,
        hostname     text NOT NULL,
        pid          integer NOT NULL,
        started_at   double precision NOT NULL,
        heartbeat_at double precision NOT NULL,
        lease_s      double precision NOT NULL,
        concurrency  integer NOT NULL,
        in_flight    integer NOT NULL DEFAULT 0,
        stopped_at   double precision
    );

    CREATE TABLE ksi_pg_requests (
        seq                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id          text NOT NULL UNIQUE,
        session_id          text,
        agent_id            text,
        originator_agent_id text,
        purpose             text,
        model               text NOT NULL,
        priority            text NOT NULL,
        rank                smallint NOT NULL,
        timeout_s           double precision,
        request_hash        text NOT NULL,
        status              text NOT NULL CHECK (status IN ('queued', 'running', 'ok', 'error', 'cancelled')),
        created_at          double precision NOT NULL,
        waiting_host        text,
        lease_owner         text,
        lease_epoch         integer NOT NULL DEFAULT 0,
        lease_expires_at    double precision,
        cancel_requested    boolean NOT NULL DEFAULT false,
        head                boolean NOT NULL,
        started_at          double precision,
        finished_at         double precision,
        result_text         text,
        result_message      json,
        finish_reason       text,
        result_model        text,
        result_provider     text,
        result_session_id   text,
        prompt_tokens       integer,
        completion_tokens   integer,
        total_tokens        integer,
        cost_usd            double precision,
        cached_tokens       integer,
        reasoning_tokens    integer,
        error_type          text,
        error_message       text
    );
    CREATE INDEX ksi_pg_requests_ready ON ksi_pg_requests (rank, seq) WHERE status = 'queued' AND head;
    CREATE INDEX ksi_pg_requests_open ON ksi_pg_requests (session_id, seq) WHERE status IN ('queued', 'running');
    CREATE INDEX ksi_pg_requests_leases ON ksi_pg_requests (lease_owner, lease_expires_at) WHERE status = 'running';
    CREATE INDEX ksi_pg_requests_session ON ksi_pg_requests (session_id, seq);

    CREATE TABLE ksi_pg_payloads (
        seq bigint PRIMARY KEY REFERENCES ksi_pg_requests (seq),
{_PAYLOAD_DDL}
    );

    CREATE TABLE ksi_pg_attempts (
        seq           bigint NOT NULL REFERENCES ksi_pg_requests (seq),
        number        integer NOT NULL,
        provider      text,
        error_type    text,
        error_message text,
        delay_s       double precision,
        latency_ms    double precision,
        ttft_ms       double precision,
        PRIMARY KEY (seq, number)
    );

    CREATE TABLE ksi_pg_waiters (
        seq     bigint NOT NULL REFERENCES ksi_pg_requests (seq),
        host_id text NOT NULL,
        PRIMARY KEY (seq, host_id)
    );

    CREATE TABLE ksi_pg_token_usage (
        id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        call_id             text NOT NULL UNIQUE,
        host_id             text,
        request_id          text NOT NULL,
        attempt             integer NOT NULL,
        session_id          text,
        agent_id            text,
        originator_agent_id text,
        purpose             text,
        model               text NOT NULL,
        provider            text NOT NULL,
        prompt_tokens       integer,
        completion_tokens   integer,
        total_tokens        integer,
        cost_usd            double precision,
        latency_ms          double precision,
        outcome             text NOT NULL,
        created_at          double precision NOT NULL
    );
    CREATE INDEX ksi_pg_token_usage_created_at ON ksi_pg_token_usage (created_at);
    CREATE INDEX ksi_pg_token_usage_request ON ksi_pg_token_usage (request_id);
    CREATE INDEX ksi_pg_token_usage_sent ON ksi_pg_token_usage (host_id) WHERE outcome = 'sent';

    CREATE FUNCTION ksi_pg_announce_work() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{WORK_CHANNEL}', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER ksi_pg_requests_work AFTER INSERT ON ksi_pg_requests
        FOR EACH STATEMENT EXECUTE FUNCTION ksi_pg_announce_work();
    """,
]

# -- accepting -------------------------------------------------------------------------------------

_REQUEST_FIELDS = ("request_id", "session_id", "agent_id", "originator_agent_id", "purpose", "model", "priority")
ACCEPT_TYPES = {
    "request_id": "text", "session_id": "text", "agent_id": "text", "originator_agent_id": "text", "purpose": "text",
    "model": "text", "priority": "text", "rank": "smallint", "timeout_s": "double precision", "request_hash": "text",
}
"""The ksi_pg_requests columns a submission sets (one array each), then the payload columns."""

# ``head`` marks the one row of a session that may run: its earliest unfinished row (a row without a session
# is always its own head). Every transaction that adds to a session or finishes a row of it (accepting,
# storing results, cancelling) holds that session's advisory lock and ends with FIX_HEADS, so the marks are
# exact when it commits; CLAIM then reads only queued heads (the ksi_pg_requests_ready index) instead of
# passing over every queued row of the sessions that have one running.
#
# Per session, rows are numbered in the order their transactions commit: each accepting transaction
# first locks the sessions it adds to (an advisory lock per session, in one order, so two batches
# never deadlock). A snapshot that sees a row of a session then sees every earlier one, which is
# what makes CLAIM's "no earlier unfinished row" test hold across hosts.
LOCK_SESSIONS = (
    "SELECT count(pg_advisory_xact_lock(k)) FROM"
    " (SELECT DISTINCT hashtextextended(s, 7395) AS k FROM unnest($1::text[]) s WHERE s IS NOT NULL ORDER BY 1) keys"
)


def _accept_sql() -> str:
    n = len(ACCEPT_TYPES)
    arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(ACCEPT_TYPES.values()))
    names = ", ".join(ACCEPT_TYPES)
    p_arrays = ", ".join(f"${n + 1 + i}::{t}[]" for i, t in enumerate(PAYLOAD_COLUMNS.values()))
    p_names = ", ".join(map(q, PAYLOAD_COLUMNS))
    host, me = n + 1 + len(PAYLOAD_COLUMNS), n + 2 + len(PAYLOAD_COLUMNS)
    return (
        f"WITH new AS (INSERT INTO ksi_pg_requests ({names}, status, created_at, waiting_host, head)"
        f" SELECT {names}, 'queued', ksi_pg_now(), ${host}, session_id IS NULL"
        f" FROM unnest({arrays}) WITH ORDINALITY AS u({names}, ord)"
        " ORDER BY ord ON CONFLICT (request_id) DO NOTHING RETURNING seq, request_id, created_at),"
        f" pay AS (INSERT INTO ksi_pg_payloads (seq, {p_names}) SELECT new.seq, {', '.join('p.' + q(c) for c in PAYLOAD_COLUMNS)}"
        f" FROM new JOIN unnest(${me}::text[], {p_arrays}) AS p(request_id, {p_names}) ON p.request_id = new.request_id)"
        " SELECT seq, request_id, created_at FROM new"
    )


FIX_HEADS = """
UPDATE ksi_pg_requests r SET head = true
FROM (SELECT min(seq) AS seq FROM ksi_pg_requests WHERE session_id = ANY($1::text[]) AND status IN ('queued', 'running')
      GROUP BY session_id) h
WHERE r.seq = h.seq AND NOT r.head
"""
"""Mark the earliest unfinished row of each session of $1 as its head (under those sessions' locks)."""

ACCEPT = _accept_sql()
"""Insert a batch of requests (ids stored before are skipped); returns (seq, request_id, created_at) of the new rows.
Parameters: one array per ACCEPT_TYPES column, one per PAYLOAD_COLUMNS column, the waiting host, the payloads'
request ids."""

ADD_WAITERS = "INSERT INTO ksi_pg_waiters (seq, host_id) SELECT s, $2 FROM unnest($1::bigint[]) s ON CONFLICT DO NOTHING"

RESULT_COLUMNS = (
    "r.seq, r.request_id, r.status, r.request_hash, r.created_at, r.started_at, r.finished_at, r.result_text,"
    " r.result_message, r.finish_reason, r.result_model, r.result_provider, r.result_session_id, r.prompt_tokens,"
    " r.completion_tokens, r.total_tokens, r.cost_usd, r.cached_tokens, r.reasoning_tokens, r.error_type, r.error_message,"
    " r.result_logprobs, r.system_fingerprint"
)
SELECT_BY_IDS = f"SELECT {RESULT_COLUMNS} FROM ksi_pg_requests r WHERE r.request_id = ANY($1::text[])"
SELECT_BY_SEQS = f"SELECT {RESULT_COLUMNS} FROM ksi_pg_requests r WHERE r.seq = ANY($1::bigint[])"
SELECT_FINAL_BY_SEQS = SELECT_BY_SEQS + " AND r.status IN ('ok', 'error', 'cancelled')"
SELECT_ATTEMPTS = (
    "SELECT seq, number, provider, error_type, error_message, delay_s, latency_ms, ttft_ms FROM ksi_pg_attempts"
    " WHERE seq = ANY($1::bigint[]) ORDER BY seq, number"
)
REQUEST_COLUMNS = (
    "r.seq, r.request_id, r.session_id, r.agent_id, r.originator_agent_id, r.purpose, r.model, r.priority, r.timeout_s, "
    + ", ".join(f"p.{q(c)}" for c in PAYLOAD_COLUMNS)
)
SELECT_REQUESTS = (
    f"SELECT {REQUEST_COLUMNS} FROM ksi_pg_requests r JOIN ksi_pg_payloads p ON p.seq = r.seq WHERE r.seq = ANY($1::bigint[])"
)

# -- claiming --------------------------------------------------------------------------------------

# The next runnable requests, best first: queued heads (no earlier row of its session is unfinished, queued or
# running, anywhere), their model not at this host's limit. (An earlier version also checked "nothing earlier
# unfinished" here with NOT EXISTS; on a young table, whose statistics say it is empty, the planner turned it
# into a scan of every unfinished row per candidate: 120 ms per claim of 64 at 8,000 rows.) FOR UPDATE SKIP LOCKED: hosts claiming at
# the same time take different rows; a row another host claimed meanwhile is re-checked on its new
# version (status no longer 'queued') and left. Claiming gives the row a new lease epoch.
CLAIM = f"""
WITH cand AS (
    SELECT r.seq FROM ksi_pg_requests r
    WHERE r.status = 'queued' AND r.head AND NOT (r.model = ANY($3::text[]))
    ORDER BY r.rank, r.seq
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
), taken AS (
    UPDATE ksi_pg_requests r SET status = 'running', lease_owner = $1, lease_epoch = r.lease_epoch + 1,
        lease_expires_at = ksi_pg_now() + $4, started_at = ksi_pg_now()
    FROM cand WHERE r.seq = cand.seq
    RETURNING r.seq, r.lease_epoch, r.created_at, r.cancel_requested
)
SELECT taken.seq, taken.lease_epoch, taken.created_at, taken.cancel_requested, {REQUEST_COLUMNS}
FROM taken JOIN ksi_pg_requests r ON r.seq = taken.seq JOIN ksi_pg_payloads p ON p.seq = taken.seq
CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS quick
ORDER BY r.rank, r.seq
"""
"""$1 this host, $2 how many at most, $3 models at their limit here, $4 lease_s. One statement (one round trip),
committed without waiting for the disk (``synchronous_commit`` off for its transaction): a claim lost in a
crash of the database only leaves its requests queued, and the ledger row of any call it leads to is flushed
before the call is sent."""

# Leases that ran out (their host stopped renewing): taken over, oldest first, like CLAIM. Calls the
# previous holder left 'sent' for these requests become 'unknown' in the same transaction: nobody
# will see how they ended, and the request runs again here.
TAKE_OVER = f"""
WITH cand AS (
    SELECT r.seq, r.request_id, r.lease_owner AS previous FROM ksi_pg_requests r
    WHERE r.status = 'running' AND r.lease_expires_at < ksi_pg_now() AND NOT (r.model = ANY($3::text[]))
    ORDER BY r.rank, r.seq
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
), taken AS (
    UPDATE ksi_pg_requests r SET lease_owner = $1, lease_epoch = r.lease_epoch + 1,
        lease_expires_at = ksi_pg_now() + $4, started_at = ksi_pg_now()
    FROM cand WHERE r.seq = cand.seq
    RETURNING r.seq, r.lease_epoch, r.created_at, r.cancel_requested
), lost AS (
    UPDATE ksi_pg_token_usage t SET outcome = 'unknown' FROM cand
    WHERE t.outcome = 'sent' AND t.request_id = cand.request_id AND t.host_id IS DISTINCT FROM $1
)
SELECT taken.seq, taken.lease_epoch, taken.created_at, taken.cancel_requested, {REQUEST_COLUMNS}
FROM taken JOIN ksi_pg_requests r ON r.seq = taken.seq JOIN ksi_pg_payloads p ON p.seq = taken.seq
CROSS JOIN (SELECT set_config('synchronous_commit', 'off', true)) AS quick
ORDER BY r.rank, r.seq
"""

# Give leases back (a host stopping, or one that claimed more of a limited model than it may run):
# the rows are queued again for any host, unless their lease moved on.
RELEASE = (
    "WITH back AS (UPDATE ksi_pg_requests r SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL"
    " FROM unnest($2::bigint[], $3::integer[]) AS u(seq, epoch)"
    " WHERE r.seq = u.seq AND r.status = 'running' AND r.lease_owner = $1 AND r.lease_epoch = u.epoch RETURNING r.seq)"
    " SELECT count(*), pg_notify('ksi_pg_work', '') FROM back"
)

# At a stop, after this host's runs ended: every row it still holds goes back to the queue (also one whose
# claim committed while its answer was lost), and the hosts are told there is work.
RELEASE_ALL = """
WITH back AS (
    UPDATE ksi_pg_requests SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL
    WHERE status = 'running' AND lease_owner = $1 RETURNING seq
)
SELECT count(*), pg_notify('ksi_pg_work', '') FROM back
"""

# -- results ----------------------------------------------------------------------------------------

_V1_STORE_TYPES = {
    "seq": "bigint", "epoch": "integer", "status": "text", "started_at": "double precision",
    "finished_at": "double precision", "result_text": "text", "result_message": "json", "finish_reason": "text",
    "result_model": "text", "result_provider": "text", "result_session_id": "text", "prompt_tokens": "integer",
    "completion_tokens": "integer", "total_tokens": "integer", "cost_usd": "double precision",
    "cached_tokens": "integer", "reasoning_tokens": "integer", "error_type": "text", "error_message": "text",
}
_V3_STORE_TYPES = {**_V1_STORE_TYPES, "result_logprobs": "json"}
STORE_TYPES = {**_V3_STORE_TYPES, "system_fingerprint": "text"}
"""The columns a stored result writes (migration 4 added ``system_fingerprint``, migration 3 ``result_logprobs``;
migration 1's ``ksi_pg_store`` wrote the others)."""
ATTEMPT_TYPES = {
    "seq": "bigint", "number": "integer", "provider": "text", "error_type": "text", "error_message": "text",
    "delay_s": "double precision", "latency_ms": "double precision", "ttft_ms": "double precision",
}


def _store_sql(store_types: dict[str, str]) -> str:
    n = len(store_types)
    arrays = ", ".join(f"${i + 2}::{t}[]" for i, t in enumerate(store_types.values()))
    sets = ", ".join(f"{c} = u.{c}" for c in store_types if c not in ("seq", "epoch"))
    a_arrays = ", ".join(f"${n + 2 + i}::{t}[]" for i, t in enumerate(ATTEMPT_TYPES.values()))
    a_names = ", ".join(ATTEMPT_TYPES)
    return f"""
WITH u AS (SELECT * FROM unnest({arrays}) AS u({', '.join(store_types)})),
done AS (
    UPDATE ksi_pg_requests r SET {sets}, lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false
    FROM u WHERE r.seq = u.seq AND r.status = 'running' AND r.lease_owner = $1 AND r.lease_epoch = u.epoch
    RETURNING r.seq, r.waiting_host
), att AS (
    INSERT INTO ksi_pg_attempts ({a_names})
    SELECT a.* FROM unnest({a_arrays}) AS a({a_names}) WHERE a.seq IN (SELECT seq FROM done)
), told AS (
    SELECT pg_notify('{HOST_CHANNEL_PREFIX}' || w.host, 'done ' || string_agg(w.seq::text, ',')) FROM (
        SELECT seq, waiting_host AS host FROM done WHERE waiting_host IS NOT NULL AND waiting_host <> $1
        UNION SELECT w.seq, w.host_id FROM ksi_pg_waiters w JOIN done ON done.seq = w.seq WHERE w.host_id <> $1
    ) w GROUP BY w.host
)
SELECT done.seq, t.told FROM done CROSS JOIN (SELECT count(*) AS told FROM told) t
"""


STORE_RESULTS = _store_sql(STORE_TYPES)
"""Store final results and end their leases in one statement: only rows this host still holds under the
same lease epoch are written (a host that lost its lease writes nothing); their attempts are inserted and
the other hosts waiting on them are told (NOTIFY on their channels; the count of notifications is selected
so that the planner cannot drop that part of the statement). Returns the seqs written.
$1 this host, then one array per STORE_TYPES column, then one per ATTEMPT_TYPES column."""

# Cancelling from any process. A queued row is cancelled in the database at once (its result stored:
# it never reaches a provider); a running row is marked cancel_requested and its holder is told.
_CANCEL_SET = (
    "status = 'cancelled', started_at = COALESCE(r.started_at, ksi_pg_now()), finished_at = ksi_pg_now(),"
    " error_type = 'Cancelled', error_message = $2, prompt_tokens = 0, completion_tokens = 0, total_tokens = 0,"
    " lease_owner = NULL, lease_expires_at = NULL"
)
_TELL_WAITERS = f"""
, told AS (
    SELECT pg_notify('{HOST_CHANNEL_PREFIX}' || w.host, 'done ' || string_agg(w.seq::text, ',')) FROM (
        SELECT seq, waiting_host AS host FROM gone WHERE waiting_host IS NOT NULL
        UNION SELECT w.seq, w.host_id FROM ksi_pg_waiters w JOIN gone ON gone.seq = w.seq
    ) w GROUP BY w.host
)
SELECT gone.seq, t.told FROM gone CROSS JOIN (SELECT count(*) AS told FROM told) t
"""
SESSION_OF = "SELECT session_id FROM ksi_pg_requests WHERE request_id = $1"
CANCEL_QUEUED = (
    f"WITH gone AS (UPDATE ksi_pg_requests r SET {_CANCEL_SET} WHERE r.request_id = $1 AND r.status = 'queued'"
    " RETURNING r.seq, r.waiting_host)" + _TELL_WAITERS
)
CLEAR_QUEUED = (
    f"WITH gone AS (UPDATE ksi_pg_requests r SET {_CANCEL_SET} WHERE r.session_id = $1 AND r.status = 'queued'"
    " RETURNING r.seq, r.waiting_host)" + _TELL_WAITERS
)
REQUEST_CANCEL = (
    "UPDATE ksi_pg_requests SET cancel_requested = true WHERE request_id = $1 AND status = 'running'"
    " RETURNING seq, lease_owner, lease_epoch"
)
SELECT_STATE = "SELECT seq, status, lease_owner FROM ksi_pg_requests WHERE request_id = $1"

# -- hosts and leases ---------------------------------------------------------------------------------

REGISTER_HOST = (
    "INSERT INTO ksi_pg_hosts (host_id, hostname, pid, started_at, heartbeat_at, lease_s, concurrency)"
    " VALUES ($1, $2, $3, ksi_pg_now(), ksi_pg_now(), $4, $5) RETURNING started_at"
)
# One statement renews this host's heartbeat and the leases of the requests it runs ($4: their seqs; a
# request whose run crashed is left out, so its lease runs out); returns the rows it still holds, with their
# cancel marks (a cancel whose NOTIFY was missed is found here).
RENEW = """
WITH beat AS (
    UPDATE ksi_pg_hosts SET heartbeat_at = ksi_pg_now(), in_flight = $3 WHERE host_id = $1 RETURNING heartbeat_at
)
UPDATE ksi_pg_requests r SET lease_expires_at = ksi_pg_now() + $2
WHERE r.status = 'running' AND r.lease_owner = $1 AND r.seq = ANY($4::bigint[])
RETURNING r.seq, r.lease_epoch, r.cancel_requested, (SELECT heartbeat_at FROM beat) AS heartbeat_at
"""
STOP_HOST = "UPDATE ksi_pg_hosts SET stopped_at = ksi_pg_now(), heartbeat_at = ksi_pg_now(), in_flight = 0 WHERE host_id = $1"
HOST_GONE = "(h.stopped_at IS NOT NULL OR h.heartbeat_at + h.lease_s < ksi_pg_now())"
"""Is the ksi_pg_hosts row ``h`` a host that is gone: stopped, or its heartbeat older than its lease? (Migration
2's ``ksi_pg_window_take`` spells the same test with its own clock reading.)"""
# Calls left 'sent' by hosts that are gone: nobody will see how they ended. Any host runs this, at start-up and
# with its heartbeats.
SETTLE_LOST_CALLS = f"""
UPDATE ksi_pg_token_usage t SET outcome = 'unknown'
FROM ksi_pg_hosts h
WHERE t.outcome = 'sent' AND t.host_id = h.host_id AND h.host_id <> $1 AND {HOST_GONE}
"""
SELECT_HOSTS = (
    "SELECT host_id, hostname, pid, started_at, heartbeat_at, lease_s, concurrency, in_flight, stopped_at, ksi_pg_now() AS now"
    " FROM ksi_pg_hosts WHERE stopped_at IS NULL OR stopped_at > ksi_pg_now() - 3600 ORDER BY started_at, host_id"
)
SELECT_STATUS = (
    "SELECT session_id, count(*) FILTER (WHERE status = 'queued') AS queued,"
    " count(*) FILTER (WHERE status = 'running') AS running,"
    " min(created_at) FILTER (WHERE status = 'queued') AS oldest, ksi_pg_now() AS now"
    " FROM ksi_pg_requests WHERE status IN ('queued', 'running') GROUP BY session_id"
)
NOW = "SELECT ksi_pg_now()"

# -- the ledger ------------------------------------------------------------------------------------------

LEDGER = "ksi_pg_token_usage"
SENT_TYPES = {
    "call_id": "text", "request_id": "text", "attempt": "integer", "session_id": "text", "agent_id": "text",
    "originator_agent_id": "text", "purpose": "text", "model": "text", "provider": "text", "created_at": "double precision",
}
END_TYPES = {
    **SENT_TYPES, "prompt_tokens": "integer", "completion_tokens": "integer", "total_tokens": "integer",
    "cost_usd": "double precision", "latency_ms": "double precision", "outcome": "text",
}


def _unnest(types: dict[str, str], first: int) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types.values()))


INSERT_SENT = (
    f"INSERT INTO {LEDGER} (host_id, outcome, {', '.join(SENT_TYPES)}) SELECT $1, 'sent', * FROM unnest({_unnest(SENT_TYPES, 2)})"
)
# How a call ended: an upsert on call_id (a call whose start was not recorded still gets its row); it sets
# the outcome whatever the row holds, so a call taken for lost ('unknown') gets its true ending if its host
# was alive after all.
RECORD_END = (
    f"INSERT INTO {LEDGER} (host_id, {', '.join(END_TYPES)}) SELECT $1, * FROM unnest({_unnest(END_TYPES, 2)})"
    " ON CONFLICT (call_id) DO UPDATE SET prompt_tokens = excluded.prompt_tokens,"
    " completion_tokens = excluded.completion_tokens, total_tokens = excluded.total_tokens,"
    " cost_usd = excluded.cost_usd, latency_ms = excluded.latency_ms, outcome = excluded.outcome"
)
SELECT_CALLS = (
    f"SELECT call_id, host_id, attempt, provider, model, prompt_tokens, completion_tokens, total_tokens, cost_usd,"
    f" latency_ms, outcome, created_at FROM {LEDGER} WHERE request_id = $1 ORDER BY id"
)


# -- one round trip per batch ------------------------------------------------------------------------------
# Accepting and storing each run as one function call: the session locks, the statement and FIX_HEADS in one
# round trip and one transaction (autocommit), instead of BEGIN, three statements and COMMIT, each a round
# trip between the host and its server process. Measured: see the README.


def _function(name: str, arg_types: list[str], returns: str, body_sql: str, sessions_arg: int) -> str:
    args = ", ".join(arg_types)
    fix = FIX_HEADS.replace("$1::text[]", f"${sessions_arg}::text[]")
    lock = LOCK_SESSIONS.replace("SELECT count(", "PERFORM count(").replace("$1::text[]", f"${sessions_arg}::text[]")
    return f"""
    CREATE FUNCTION {name}({args}) RETURNS {returns} LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    BEGIN
        {lock};
        RETURN QUERY {body_sql};
        {fix};
    END $fn$;
    """


_ACCEPT_ARGS = ([f"{t}[]" for t in ACCEPT_TYPES.values()] + [f"{t}[]" for t in PAYLOAD_COLUMNS.values()]
                + ["text", "text[]"])


def _store_args(store_types: dict[str, str]) -> list[str]:
    return ["text"] + [f"{t}[]" for t in store_types.values()] + [f"{t}[]" for t in ATTEMPT_TYPES.values()] + ["text[]"]


_V1_STORE_ARGS = _store_args(_V1_STORE_TYPES)
_V3_STORE_ARGS = _store_args(_V3_STORE_TYPES)
_STORE_ARGS = _store_args(STORE_TYPES)

MIGRATIONS[0] += _function("ksi_pg_accept", _ACCEPT_ARGS, "TABLE (seq bigint, request_id text, created_at double precision)",
                           ACCEPT, 2)
MIGRATIONS[0] += _function("ksi_pg_store", _V1_STORE_ARGS, "TABLE (seq bigint, told bigint)", _store_sql(_V1_STORE_TYPES),
                           len(_V1_STORE_ARGS))

ACCEPT_CALL = f"SELECT * FROM ksi_pg_accept({', '.join(f'${i + 1}' for i in range(len(_ACCEPT_ARGS)))})"
"""ACCEPT under the locks of its sessions, then FIX_HEADS, in one call. Parameters as ACCEPT's."""
STORE_CALL = f"SELECT * FROM ksi_pg_store({', '.join(f'${i + 1}' for i in range(len(_STORE_ARGS)))})"
"""STORE_RESULTS under the locks of its sessions, then FIX_HEADS, in one call. Parameters as STORE_RESULTS's, then
the sessions of the batch."""

# -- the shared rate windows (ksi_window_store; windows.py has their queries) ---------------------------------

WINDOWS_MIGRATION = """
CREATE TABLE ksi_pg_windows (
    rule     integer NOT NULL,
    name     text NOT NULL,
    window_s double precision NOT NULL,
    tokens   bigint NOT NULL DEFAULT 0,
    requests bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rule, name)
);

CREATE TABLE ksi_pg_window_leases (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule       integer NOT NULL,
    name       text NOT NULL,
    host_id    text NOT NULL,
    lease      text NOT NULL,
    tokens     integer NOT NULL,
    started_at double precision NOT NULL,
    ended_at   double precision,
    counted    boolean NOT NULL DEFAULT false,
    FOREIGN KEY (rule, name) REFERENCES ksi_pg_windows (rule, name)
);
CREATE INDEX ksi_pg_window_leases_key ON ksi_pg_window_leases (rule, name, ended_at);
CREATE INDEX ksi_pg_window_leases_open ON ksi_pg_window_leases (rule, name) WHERE NOT counted;
CREATE UNIQUE INDEX ksi_pg_window_leases_held ON ksi_pg_window_leases (host_id, lease, rule, name) WHERE ended_at IS NULL;

CREATE FUNCTION ksi_pg_window_take(p_host text, p_lease text, p_rules integer[], p_names text[],
    p_window double precision[], p_rpm bigint[], p_tpm bigint[], p_conc bigint[], p_tokens integer[])
RETURNS TABLE (o_rule integer, o_name text, o_retry_in double precision) LANGUAGE plpgsql AS $fn$
DECLARE
    t_now double precision := ksi_pg_now();
    k record;
    d_tokens bigint;
    d_requests bigint;
    n_tokens bigint;
    n_requests bigint;
    n_flight bigint;
    ex_tokens bigint;
    ex_requests bigint;
    refused boolean := false;
BEGIN
    INSERT INTO ksi_pg_windows (rule, name, window_s)
        SELECT u.r, u.n, u.w FROM unnest(p_rules, p_names, p_window) AS u(r, n, w) ORDER BY u.r, u.n
        ON CONFLICT DO NOTHING;
    PERFORM 1 FROM ksi_pg_windows kw JOIN unnest(p_rules, p_names) AS u(r, n) ON kw.rule = u.r AND kw.name = u.n
        ORDER BY kw.rule, kw.name FOR UPDATE OF kw;
    FOR k IN SELECT * FROM unnest(p_rules, p_names, p_window, p_rpm, p_tpm, p_conc, p_tokens)
             AS u(r, n, w, rpm, tpm, conc, tok) ORDER BY u.r, u.n LOOP
        -- the leases in flight of hosts that are gone end now
        UPDATE ksi_pg_window_leases l SET ended_at = t_now FROM ksi_pg_hosts h
         WHERE l.rule = k.r AND l.name = k.n AND l.ended_at IS NULL AND NOT l.counted AND h.host_id = l.host_id
           AND (h.stopped_at IS NOT NULL OR h.heartbeat_at + h.lease_s < t_now);
        -- the key's row sums its counted leases: those that ended since the last take join them, those that
        -- slid out leave them (and the table)
        WITH folded AS (
            UPDATE ksi_pg_window_leases SET counted = true
            WHERE rule = k.r AND name = k.n AND NOT counted AND ended_at IS NOT NULL RETURNING tokens
        ) SELECT coalesce(sum(tokens), 0), count(*) INTO d_tokens, d_requests FROM folded;
        WITH gone AS (
            DELETE FROM ksi_pg_window_leases WHERE rule = k.r AND name = k.n AND counted AND ended_at <= t_now - k.w
            RETURNING tokens
        ) SELECT d_tokens - coalesce(sum(tokens), 0), d_requests - count(*) INTO d_tokens, d_requests FROM gone;
        UPDATE ksi_pg_windows SET tokens = tokens + d_tokens, requests = requests + d_requests, window_s = k.w
         WHERE rule = k.r AND name = k.n RETURNING tokens, requests INTO n_tokens, n_requests;
        -- plus what is not counted yet: in flight (or ended after the fold: only takes set counted, under the lock)
        SELECT n_tokens + coalesce(sum(tokens), 0), n_requests + count(*), count(*) FILTER (WHERE ended_at IS NULL)
          INTO n_tokens, n_requests, n_flight FROM ksi_pg_window_leases WHERE rule = k.r AND name = k.n AND NOT counted;
        CONTINUE WHEN (k.tpm IS NULL OR n_tokens + k.tok <= k.tpm) AND (k.rpm IS NULL OR n_requests < k.rpm)
                  AND (k.conc IS NULL OR n_flight < k.conc);
        refused := true;
        o_rule := k.r;
        o_name := k.n;
        o_retry_in := NULL;
        IF k.conc IS NULL OR n_flight < k.conc THEN
            ex_tokens := CASE WHEN k.tpm IS NULL THEN 0 ELSE n_tokens + k.tok - k.tpm END;
            ex_requests := CASE WHEN k.rpm IS NULL THEN 0 ELSE n_requests + 1 - k.rpm END;
            SELECT s.e + k.w - t_now INTO o_retry_in FROM (
                SELECT ended_at AS e, sum(tokens) OVER (ORDER BY ended_at, id) AS ct,
                       count(*) OVER (ORDER BY ended_at, id) AS cr
                FROM ksi_pg_window_leases WHERE rule = k.r AND name = k.n AND ended_at IS NOT NULL) s
            WHERE s.ct >= ex_tokens AND s.cr >= ex_requests ORDER BY s.e LIMIT 1;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF NOT refused THEN
        INSERT INTO ksi_pg_window_leases (rule, name, host_id, lease, tokens, started_at)
            SELECT u.r, u.n, p_host, p_lease, u.tok, t_now FROM unnest(p_rules, p_names, p_tokens) AS u(r, n, tok);
    END IF;
END $fn$;
"""
"""Migration 2 of ksi-postgres: the tables of the shared windows and ``ksi_pg_window_take`` (see
ksi_postgres.windows). ``ksi_pg_window_take`` answers no row when it took the lease, else one row per key
lacking room."""

MIGRATIONS.append(WINDOWS_MIGRATION)

LOGPROBS_MIGRATION = f"""
ALTER TABLE ksi_pg_requests ADD COLUMN result_logprobs json;
DROP FUNCTION ksi_pg_store({', '.join(_V1_STORE_ARGS)});
""" + _function("ksi_pg_store", _V3_STORE_ARGS, "TABLE (seq bigint, told bigint)", _store_sql(_V3_STORE_TYPES),
                len(_V3_STORE_ARGS))
"""Migration 3 of ksi-postgres: a result's log probabilities (OpenAI's ``choices[0].logprobs``, a JSON document; NULL
when the request did not ask for them, as in every row stored before), and ``ksi_pg_store`` writing them."""

MIGRATIONS.append(LOGPROBS_MIGRATION)

FINGERPRINT_MIGRATION = f"""
ALTER TABLE ksi_pg_requests ADD COLUMN system_fingerprint text;
DROP FUNCTION ksi_pg_store({', '.join(_V3_STORE_ARGS)});
""" + _function("ksi_pg_store", _STORE_ARGS, "TABLE (seq bigint, told bigint)", STORE_RESULTS, len(_STORE_ARGS))
"""Migration 4 of ksi-postgres: the upstream's ``system_fingerprint`` of a result (which backend configuration
answered; NULL when it sent none, as in every row stored before), and ``ksi_pg_store`` writing it."""

MIGRATIONS.append(FINGERPRINT_MIGRATION)
