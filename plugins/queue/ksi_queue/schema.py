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
]

REQUEST_COLUMNS = (
    "r.seq, r.request_id, r.session_id, r.agent_id, r.originator_agent_id, r.purpose, r.model, r.priority,"
    " r.max_tokens, r.temperature, r.timeout_s"
)
RESULT_COLUMNS = (
    "request_hash, status, started_at, finished_at, result_text, result_model, result_provider, result_session_id,"
    " prompt_tokens, completion_tokens, total_tokens, cost_usd, error_type, error_message"
)

_REQUEST_INSERT_COLUMNS = (
    "seq, request_id, session_id, agent_id, originator_agent_id, purpose, model, priority, max_tokens, temperature,"
    " timeout_s, status, created_at, request_hash"
)
INSERT_REQUEST = (
    f"INSERT INTO ksi_queue_requests ({_REQUEST_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)"
)
# Accepting in one transaction without looking first: a request id stored before is skipped
# (not counted in the transaction's changes), and so is the payload of a row that was not inserted.
INSERT_REQUEST_NEW = INSERT_REQUEST + " ON CONFLICT(request_id) DO NOTHING"
INSERT_PAYLOAD_NEW = (
    "INSERT INTO ksi_queue_payloads (seq, messages_json, metadata_json)"
    " SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM ksi_queue_requests WHERE seq = ?1)"
)

# The owner row is absent, or is the one the writer saw (a process that is gone); two parameters: its pid and
# started_at, or NULL and NULL. `IS` compares NULL as a value: an owner row written since never matches.
OWNER_UNCHANGED = "NOT EXISTS (SELECT 1 FROM ksi_queue_owner WHERE NOT (pid IS ? AND started_at IS ?))"
# A process that does not serve stores a request only while no process serves (SQLite numbers the row; the
# serving process reads the highest seq after it claimed the queue, so the numbers never collide).
INSERT_REQUEST_UNSERVED = (
    f"INSERT INTO ksi_queue_requests ({_REQUEST_INSERT_COLUMNS})"
    f" SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ? WHERE {OWNER_UNCHANGED} ON CONFLICT(request_id) DO NOTHING"
)
INSERT_PAYLOAD_UNSERVED = (  # (messages_json, metadata_json, request_id): the payload of the row just inserted, if any
    "INSERT INTO ksi_queue_payloads (seq, messages_json, metadata_json)"
    " SELECT seq, ?, ? FROM ksi_queue_requests WHERE request_id = ? ON CONFLICT(seq) DO NOTHING"
)
MARK_RUNNING = "UPDATE ksi_queue_requests SET status = 'running', started_at = ? WHERE seq = ? AND status = 'queued'"
STORE_RESULT = (
    "UPDATE ksi_queue_requests SET status = ?, started_at = ?, finished_at = ?, result_text = ?, result_model = ?,"
    " result_provider = ?, result_session_id = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?, cost_usd = ?,"
    " error_type = ?, error_message = ? WHERE seq = ?"
)
INSERT_ATTEMPT = (
    "INSERT INTO ksi_queue_attempts (request_id, number, provider, error_type, error_message, delay_s, latency_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
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

SELECT_UNFINISHED = (
    "SELECT seq, request_id, session_id, model, priority, created_at FROM ksi_queue_requests"
    " WHERE status IN ('queued', 'running') ORDER BY seq"
)
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
        f"SELECT {REQUEST_COLUMNS}, p.messages_json, p.metadata_json FROM ksi_queue_requests r"
        f" JOIN ksi_queue_payloads p ON p.seq = r.seq WHERE r.seq IN ({marks})"
    )


def select_attempts(n: int) -> str:
    marks = ", ".join("?" * n)
    return (
        "SELECT request_id, number, provider, error_type, error_message, delay_s, latency_ms FROM ksi_queue_attempts"
        f" WHERE request_id IN ({marks}) ORDER BY request_id, number"
    )


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
