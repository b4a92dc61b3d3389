"""The queue's tables and the SQL that touches them.

``ksi_queue_requests`` holds one row per accepted request: the request's
fields in real columns, its queue status and, once final, its result in real
columns. ``seq`` is the submission order (restore order). The messages and
metadata (JSON text, each in a column of its own) live in
``ksi_queue_payloads``, written once and never rewritten when the status
changes. ``ksi_queue_attempts`` holds the attempts of final results, one row
each. ``ksi_queue_owner`` names the process that
serves the queue; ``ksi_queue_commands`` carries cancel / clear-session
requests from other processes (``ksi-host cancel``) to that process.

Every write that depends on who serves the queue (claiming it; a process that
does not serve storing or cancelling rows) carries its check in the statement
itself (``WHERE`` on ``ksi_queue_owner``) and is counted, so the check and the
write are one transaction: a process that starts serving in between makes the
write change nothing, and the writer looks again.
"""

from __future__ import annotations

OWNER = "ksi-queue"
UNFINISHED = ("queued", "running")
FINAL = ("ok", "error", "cancelled")

_V1_COLUMNS = (
    "seq, request_id, session_id, agent_id, originator_agent_id, purpose, model, priority, max_tokens, temperature,"
    " timeout_s, status, created_at, started_at, finished_at, result_text, result_model, result_provider,"
    " result_session_id, prompt_tokens, completion_tokens, total_tokens, cost_usd, error_type, error_message"
)

MIGRATIONS = [
    """
    CREATE TABLE ksi_queue_requests (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        session_id TEXT,
        agent_id TEXT,
        originator_agent_id TEXT,
        purpose TEXT,
        model TEXT NOT NULL,
        priority TEXT NOT NULL,
        max_tokens INTEGER,
        temperature REAL,
        timeout_s REAL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'ok', 'error', 'cancelled')),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        result_text TEXT,
        result_model TEXT,
        result_provider TEXT,
        result_session_id TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT
    );
    CREATE INDEX ksi_queue_requests_unfinished ON ksi_queue_requests(seq) WHERE status IN ('queued', 'running');
    CREATE TABLE ksi_queue_payloads (
        seq INTEGER PRIMARY KEY REFERENCES ksi_queue_requests(seq),
        messages_json TEXT NOT NULL,
        metadata_json TEXT NOT NULL
    );
    CREATE TABLE ksi_queue_attempts (
        request_id TEXT NOT NULL REFERENCES ksi_queue_requests(request_id),
        number INTEGER NOT NULL,
        provider TEXT,
        error_type TEXT,
        error_message TEXT,
        delay_s REAL,
        latency_ms REAL,
        PRIMARY KEY (request_id, number)
    ) WITHOUT ROWID;
    CREATE TABLE ksi_queue_owner (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        process_start TEXT,
        started_at REAL NOT NULL
    );
    CREATE TABLE ksi_queue_commands (
        command_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('cancel', 'clear_session')),
        target TEXT NOT NULL,
        requested_at REAL NOT NULL,
        handled_at REAL,
        outcome INTEGER
    );
    """,
    # v2: the same status rule, written as equalities. SQLite evaluates `status IN (five values)`
    # by filling a temporary table at every insert and update of a row: 6 to 7 us each, a third of
    # the cost of both statements (measured; the IN list of the partial index, two values, costs
    # nothing). A CHECK cannot be changed in place: the table is rebuilt (Database.migrate runs
    # this with foreign keys off and checks them before it commits).
    f"""
    CREATE TABLE ksi_queue_requests_v2 (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        session_id TEXT,
        agent_id TEXT,
        originator_agent_id TEXT,
        purpose TEXT,
        model TEXT NOT NULL,
        priority TEXT NOT NULL,
        max_tokens INTEGER,
        temperature REAL,
        timeout_s REAL,
        status TEXT NOT NULL CHECK (status = 'queued' OR status = 'running' OR status = 'ok' OR status = 'error'
                                    OR status = 'cancelled'),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        result_text TEXT,
        result_model TEXT,
        result_provider TEXT,
        result_session_id TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        cost_usd REAL,
        error_type TEXT,
        error_message TEXT
    );
    INSERT INTO ksi_queue_requests_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM ksi_queue_requests;
    DROP TABLE ksi_queue_requests;
    ALTER TABLE ksi_queue_requests_v2 RENAME TO ksi_queue_requests;
    CREATE INDEX ksi_queue_requests_unfinished ON ksi_queue_requests(seq) WHERE status IN ('queued', 'running');
    """,
    # v3: a hash of what the request asks (model, messages, max_tokens, temperature: see store.request_hash), so
    # a request id submitted again with a different request is refused instead of answered with the old result.
    # Rows stored before have none (NULL) and are accepted as before.
    """
    ALTER TABLE ksi_queue_requests ADD COLUMN request_hash TEXT
    """,
    # v4: the whole chat surface (issue 17). The scalar chat parameters become columns of the request row
    # (booleans as 0/1), the chat parameters that are JSON documents (tool schemas, response_format, ...)
    # columns of the payload; the result keeps its finish_reason, cached and reasoning tokens and its assistant
    # message (a document: its tool calls), the attempt its time to first token. Rows stored before keep NULL
    # there (and continue_session 0), which is what those requests asked or all that is known of them.
    # The indexes serve ksi_list_requests (ksi-host logs): newest first (created_at, then seq: the rowid every
    # index ends with), alone or within one session, agent or model, each read from its newest end. By status:
    # the few failed rows have a partial index of their own (written only when a request fails), the unfinished
    # ones the partial index of v1; 'ok' rows are most rows, found reading the time index. An index on status
    # itself would be written three times per request (queued, then deleted, then ok): about 2 us more per request
    # (a loop of the queue's and the ledger's statements, commits of 16) for what reading the time index does as fast.
    """
    ALTER TABLE ksi_queue_requests ADD COLUMN max_completion_tokens INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN top_p REAL;
    ALTER TABLE ksi_queue_requests ADD COLUMN seed INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN presence_penalty REAL;
    ALTER TABLE ksi_queue_requests ADD COLUMN frequency_penalty REAL;
    ALTER TABLE ksi_queue_requests ADD COLUMN logprobs INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN top_logprobs INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN n INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN user TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN parallel_tool_calls INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN reasoning_effort TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN verbosity TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN service_tier TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN store INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN prompt_cache_key TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN safety_identifier TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN continue_session INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE ksi_queue_requests ADD COLUMN finish_reason TEXT;
    ALTER TABLE ksi_queue_requests ADD COLUMN cached_tokens INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN reasoning_tokens INTEGER;
    ALTER TABLE ksi_queue_requests ADD COLUMN result_message_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN tools_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN tool_choice_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN response_format_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN stop_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN logit_bias_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN modalities_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN audio_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN prediction_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN web_search_options_json TEXT;
    ALTER TABLE ksi_queue_payloads ADD COLUMN provider_options_json TEXT;
    ALTER TABLE ksi_queue_attempts ADD COLUMN ttft_ms REAL;
    CREATE INDEX ksi_queue_requests_created ON ksi_queue_requests(created_at);
    CREATE INDEX ksi_queue_requests_session ON ksi_queue_requests(session_id, created_at);
    CREATE INDEX ksi_queue_requests_agent ON ksi_queue_requests(agent_id, created_at);
    CREATE INDEX ksi_queue_requests_model ON ksi_queue_requests(model, created_at);
    CREATE INDEX ksi_queue_requests_failed ON ksi_queue_requests(created_at) WHERE status = 'error' OR status = 'cancelled';
    """,
    # v5: the answer's log probabilities (a document: OpenAI's choice.logprobs), NULL when the request did not ask
    # for them (or the upstream sent none), as in every row stored before.
    """
    ALTER TABLE ksi_queue_requests ADD COLUMN result_logprobs_json TEXT;
    """,
    # v6: the upstream's system_fingerprint (which backend configuration answered), NULL when it sent none, as in
    # every row stored before.
    """
    ALTER TABLE ksi_queue_requests ADD COLUMN system_fingerprint TEXT;
    """,
]

SCALAR_PARAMETERS = (
    "max_completion_tokens", "top_p", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "n",
    "user", "parallel_tool_calls", "reasoning_effort", "verbosity", "service_tier", "store", "prompt_cache_key",
    "safety_identifier",
)
"""The chat parameters stored as columns of ``ksi_queue_requests`` (under their own names; besides ``max_tokens``
and ``temperature``, columns since v1)."""
BOOLEAN_PARAMETERS = ("logprobs", "parallel_tool_calls", "store")
"""Of those, the ones stored as 0/1 and read back as booleans."""
DOCUMENTS = (
    "tools", "tool_choice", "response_format", "stop", "logit_bias", "modalities", "audio", "prediction",
    "web_search_options", "provider_options",
)
"""The request fields that are JSON documents, stored in ``ksi_queue_payloads`` as ``<name>_json`` (NULL when unset)."""

# The request's own columns (besides seq and request_id), as request_from_row reads them.
REQUEST_FIELDS = (
    "session_id", "agent_id", "originator_agent_id", "purpose", "model", "priority", "max_tokens", "temperature",
    "timeout_s", *SCALAR_PARAMETERS, "continue_session",
)
PAYLOAD_COLUMNS = ("messages_json", "metadata_json", *(f"{name}_json" for name in DOCUMENTS))

REQUEST_COLUMNS = ", ".join(("r.seq", "r.request_id", *(f"r.{c}" for c in REQUEST_FIELDS), "r.created_at"))
PAYLOAD_SELECT = ", ".join(f"p.{c}" for c in PAYLOAD_COLUMNS)
RESULT_COLUMNS = (
    "request_hash, status, created_at, started_at, finished_at, result_text, result_model, result_provider,"
    " result_session_id, prompt_tokens, completion_tokens, total_tokens, cost_usd, cached_tokens, reasoning_tokens,"
    " error_type, error_message, finish_reason, result_message_json, result_logprobs_json,"
    " system_fingerprint"
)

# Accepting a request writes its row and its payload, in the order of these columns (status: 'queued'). The chat
# parameter columns come last, and so do the document columns: a request that sets none of them binds none
# (they stay NULL, continue_session 0). Python's sqlite3 binds a None through its adapter lookup, about 0.27 us
# each against 0.02 for an int: the 27 NULLs of a request that sets no parameter cost 7.5 us per request on the
# database thread (measured: 20,000 requests in batches of 16, 10.5 -> 18 us for the two inserts).
# So each statement has two forms, keyed by the number of values given.
_REQUEST_INSERT = ("seq", "request_id", *REQUEST_FIELDS[:9], "status", "created_at", "request_hash")
_CHAT_COLUMNS = (*SCALAR_PARAMETERS, "continue_session")
PLAIN_REQUEST_VALUES = len(_REQUEST_INSERT) - 1  # (status is the constant 'queued')
PLAIN_PAYLOAD_VALUES = 3  # seq, messages, metadata


def _values(columns: tuple[str, ...]) -> str:
    return ", ".join("'queued'" if c == "status" else "?" for c in columns)


def _request_forms(tail: str) -> dict[int, str]:
    """The INSERT of a request row for a row of each length (``tail``: what follows its values)."""
    forms = {}
    for columns in (_REQUEST_INSERT, _REQUEST_INSERT + _CHAT_COLUMNS):
        forms[len(columns) - 1] = f"INSERT INTO ksi_queue_requests ({', '.join(columns)}) {tail.format(_values(columns))}"
    return forms


# Accepting in one transaction without looking first: a request id stored before is skipped
# (not counted in the transaction's changes), and so is the payload of a row that was not inserted.
INSERT_REQUEST_NEW = _request_forms("VALUES ({}) ON CONFLICT(request_id) DO NOTHING")
INSERT_PAYLOAD_NEW = {  # (seq, messages_json, metadata_json[, <document>_json...])
    n: f"INSERT INTO ksi_queue_payloads (seq, {', '.join(PAYLOAD_COLUMNS[:n - 1])})"
       f" SELECT {', '.join(f'?{i}' for i in range(1, n + 1))} WHERE EXISTS (SELECT 1 FROM ksi_queue_requests WHERE seq = ?1)"
    for n in (PLAIN_PAYLOAD_VALUES, 1 + len(PAYLOAD_COLUMNS))
}

# The owner row is absent, or is the one the writer saw (a process that is gone); two parameters: its pid and
# started_at, or NULL and NULL. `IS` compares NULL as a value: an owner row written since never matches.
OWNER_UNCHANGED = "NOT EXISTS (SELECT 1 FROM ksi_queue_owner WHERE NOT (pid IS ? AND started_at IS ?))"
# A process that does not serve stores a request only while no process serves (SQLite numbers the row; the
# serving process reads the highest seq after it claimed the queue, so the numbers never collide).
INSERT_REQUEST_UNSERVED = _request_forms(f"SELECT {{}} WHERE {OWNER_UNCHANGED} ON CONFLICT(request_id) DO NOTHING")
INSERT_PAYLOAD_UNSERVED = {  # (messages_json, metadata_json[, <document>_json...], request_id): keyed as above
    n: f"INSERT INTO ksi_queue_payloads (seq, {', '.join(PAYLOAD_COLUMNS[:n - 1])})"  # the payload of the row just
       f" SELECT seq, {', '.join(['?'] * (n - 1))} FROM ksi_queue_requests WHERE request_id = ?"  # inserted, if any
       " ON CONFLICT(seq) DO NOTHING"
    for n in (PLAIN_PAYLOAD_VALUES, 1 + len(PAYLOAD_COLUMNS))
}
MARK_RUNNING = "UPDATE ksi_queue_requests SET status = 'running', started_at = ? WHERE seq = ? AND status = 'queued'"
STORE_RESULT = (
    "UPDATE ksi_queue_requests SET status = ?, started_at = ?, finished_at = ?, result_text = ?, result_model = ?,"
    " result_provider = ?, result_session_id = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?, cost_usd = ?,"
    " cached_tokens = ?, reasoning_tokens = ?, error_type = ?, error_message = ?, finish_reason = ?,"
    " result_message_json = ?, result_logprobs_json = ?, system_fingerprint = ? WHERE seq = ?"
)
ATTEMPT_COLUMNS = "request_id, number, provider, error_type, error_message, delay_s, latency_ms, ttft_ms"
INSERT_ATTEMPT = f"INSERT INTO ksi_queue_attempts ({ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
# Cancelling a row no process has in memory (``ksi-host cancel`` on a stopped queue), while the owner row is
# unchanged: (now, now, message, request_id or session_id, owner pid, owner started_at).
_CANCEL_ROWS = (
    "UPDATE ksi_queue_requests SET status = 'cancelled', started_at = COALESCE(started_at, ?), finished_at = ?,"
    " error_type = 'Cancelled', error_message = ?, prompt_tokens = 0, completion_tokens = 0, total_tokens = 0"
)
CANCEL_STORED = _CANCEL_ROWS + f" WHERE request_id = ? AND status IN ('queued', 'running') AND {OWNER_UNCHANGED}"
CLEAR_STORED = (
    _CANCEL_ROWS + f" WHERE status IN ('queued', 'running') AND session_id = ? AND status = 'queued' AND {OWNER_UNCHANGED}"
)
# The rows one CLEAR_STORED cancelled (its session, its finished_at and its message), to report their results.
SELECT_CLEARED = (
    "SELECT request_id FROM ksi_queue_requests WHERE session_id = ? AND status = 'cancelled' AND finished_at = ?"
    " AND error_message = ? ORDER BY seq"
)

SELECT_UNFINISHED = (
    "SELECT seq, request_id, session_id, model, priority, created_at FROM ksi_queue_requests"
    " WHERE status IN ('queued', 'running') ORDER BY seq"
)
# At a serving start, before restoring: a row still 'running' was left so by a process that is gone; it runs
# again, so it is queued (the first condition lets SQLite use the index of unfinished rows).
REQUEUE_RUNNING = "UPDATE ksi_queue_requests SET status = 'queued' WHERE status IN ('queued', 'running') AND status = 'running'"
SELECT_MAX_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM ksi_queue_requests"
SELECT_STATUS = (
    "SELECT session_id, SUM(status = 'queued'), SUM(status = 'running'), MIN(CASE WHEN status = 'queued' THEN created_at END)"
    " FROM ksi_queue_requests WHERE status IN ('queued', 'running') GROUP BY session_id"
)


def select_results(n: int) -> str:
    """Status and result columns of the rows whose request id is one of ``n`` values."""
    marks = ", ".join("?" * n)
    return f"SELECT seq, request_id, {RESULT_COLUMNS} FROM ksi_queue_requests WHERE request_id IN ({marks})"


def select_requests(n: int) -> str:
    """The requests (fields and payload) of the rows whose seq is one of ``n`` values."""
    marks = ", ".join("?" * n)
    return (
        f"SELECT {REQUEST_COLUMNS}, {PAYLOAD_SELECT} FROM ksi_queue_requests r"
        f" JOIN ksi_queue_payloads p ON p.seq = r.seq WHERE r.seq IN ({marks})"
    )


def select_attempts(n: int) -> str:
    marks = ", ".join("?" * n)
    return f"SELECT {ATTEMPT_COLUMNS} FROM ksi_queue_attempts WHERE request_id IN ({marks}) ORDER BY request_id, number"


SELECT_OWNER = "SELECT pid, process_start, started_at FROM ksi_queue_owner WHERE id = 1"
# Claiming the queue, in one transaction: the owner row seen (a process that is gone) is deleted, and ours is
# inserted unless a row is there. Counted: nothing changed means another process claimed it meanwhile.
DELETE_OWNER = "DELETE FROM ksi_queue_owner WHERE id = 1 AND pid = ? AND started_at = ?"
CLAIM_OWNER = (
    "INSERT INTO ksi_queue_owner (id, pid, process_start, started_at) VALUES (1, ?, ?, ?) ON CONFLICT(id) DO NOTHING"
)
CLEAR_OWNER = "DELETE FROM ksi_queue_owner WHERE id = 1 AND pid = ? AND started_at = ?"

INSERT_COMMAND = "INSERT INTO ksi_queue_commands (command_id, kind, target, requested_at) VALUES (?, ?, ?, ?)"
SELECT_COMMAND = "SELECT handled_at, outcome FROM ksi_queue_commands WHERE command_id = ?"
SELECT_OPEN_COMMANDS = (
    "SELECT command_id, kind, target FROM ksi_queue_commands WHERE handled_at IS NULL ORDER BY requested_at, command_id"
)
ANSWER_COMMAND = "UPDATE ksi_queue_commands SET handled_at = ?, outcome = ? WHERE command_id = ?"
EXPIRE_COMMANDS = "UPDATE ksi_queue_commands SET handled_at = ?, outcome = NULL WHERE handled_at IS NULL"
PURGE_COMMANDS = "DELETE FROM ksi_queue_commands WHERE handled_at IS NOT NULL AND handled_at < ?"
