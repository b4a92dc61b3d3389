"""The tables of ksi-sessions (in the host database) and the statements that read and write them.

``session_turns``: one row per ok request of a session (a turn): its number in the session, its request
id (unique: a result written again replaces its turn, never adds one), whether it continued the
conversation (``continue_session``) or began a new one, its estimated size, what answered it.

``session_messages``: one row per message of a turn, in order: the request's own messages (not the
earlier turns a continuing request was sent with: those are rows of their own turns), then the answer.
Text content, tool calls, tool call ids and refusals have columns; content parts, tool calls' list and any
other key of a message are JSON documents (see :mod:`ksi_sessions.transcript`).
"""

from __future__ import annotations

OWNER = "sessions"
MIGRATIONS = [
    """
    CREATE TABLE session_turns (
        session_id TEXT NOT NULL,
        turn INTEGER NOT NULL,                  -- 1, 2, ... within the session
        request_id TEXT NOT NULL UNIQUE,
        continues INTEGER NOT NULL,             -- 1: continued the conversation; 0: began a new one
        messages INTEGER NOT NULL,              -- how many rows it has in session_messages
        tokens INTEGER NOT NULL,                -- the estimated size of its messages
        model TEXT,                             -- what answered (the upstream's model name, if it said)
        provider TEXT,                          -- the deployment that answered
        created_at REAL NOT NULL,               -- unix seconds, when its result was final
        PRIMARY KEY (session_id, turn)
    );
    CREATE TABLE session_messages (
        session_id TEXT NOT NULL,
        turn INTEGER NOT NULL,
        position INTEGER NOT NULL,              -- 0, 1, ... within the turn; the answer is the last
        role TEXT NOT NULL,
        content TEXT,                           -- text content (NULL: none, or content parts)
        content_parts TEXT,                     -- JSON: a list of content parts
        name TEXT,
        tool_calls TEXT,                        -- JSON: an assistant message's tool calls
        tool_call_id TEXT,                      -- a tool result's call
        refusal TEXT,
        extra TEXT,                             -- JSON: any other key of the message (audio, cache_control, ...)
        tokens INTEGER NOT NULL,                -- the message's estimated size
        request_id TEXT NOT NULL,
        PRIMARY KEY (session_id, turn, position),
        FOREIGN KEY (session_id, turn) REFERENCES session_turns (session_id, turn) ON DELETE CASCADE
    );
    """,
]

# -- writing a turn (one transaction: DELETE_MESSAGES, UPSERT_TURN, then INSERT_MESSAGE per message) ------

DELETE_MESSAGES = (
    "DELETE FROM session_messages WHERE (session_id, turn) = (SELECT session_id, turn FROM session_turns WHERE request_id = ?)"
)
"""The messages of a request's turn written before (a result written again): by the turn's key, not a scan."""
UPSERT_TURN = (
    "INSERT INTO session_turns (session_id, turn, request_id, continues, messages, tokens, model, provider, created_at)"
    " VALUES (?1, COALESCE((SELECT MAX(turn) FROM session_turns WHERE session_id = ?1), 0) + 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    " ON CONFLICT (request_id) DO UPDATE SET continues = excluded.continues, messages = excluded.messages,"
    " tokens = excluded.tokens, model = excluded.model, provider = excluded.provider, created_at = excluded.created_at"
)
"""A new turn numbered after the session's last; a request that has a turn already keeps its number."""
INSERT_MESSAGE = (
    "INSERT INTO session_messages (session_id, turn, position, role, content, content_parts, name, tool_calls,"
    " tool_call_id, refusal, extra, tokens, request_id)"
    " SELECT session_id, turn, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, request_id FROM session_turns WHERE request_id = ?"
)
DELETE_TURN = "DELETE FROM session_turns WHERE request_id = ?"  # its messages go with it (ON DELETE CASCADE)
HAS_TURN = "SELECT 1 FROM session_turns WHERE request_id = ?"

# -- reading ------------------------------------------------------------------------------------------------

CONVERSATION_TURNS = (
    "SELECT turn, tokens FROM session_turns WHERE session_id = ?1 AND request_id != ?2"
    " AND turn >= COALESCE((SELECT MAX(turn) FROM session_turns"
    "                       WHERE session_id = ?1 AND continues = 0 AND request_id != ?2), 0)"
    " ORDER BY turn"
)
"""The earlier turns of the conversation a request (?2) of session ?1 continues: from the last turn that
began a new conversation (or the first turn) on; the request's own turn, written by an earlier run of it
that was not stored (a crash), is left out."""
MESSAGES_FROM = (
    "SELECT * FROM session_messages WHERE session_id = ? AND turn >= ? AND request_id != ? ORDER BY turn, position"
)
MESSAGES_OF_TURN = "SELECT * FROM session_messages WHERE session_id = ? AND turn = ? ORDER BY position"

TURNS_OF_SESSION = "SELECT * FROM session_turns WHERE session_id = ? ORDER BY turn"
ALL_MESSAGES_OF_SESSION = "SELECT * FROM session_messages WHERE session_id = ? ORDER BY turn, position"
TURN_COUNT = "SELECT COUNT(*) FROM session_turns WHERE session_id = ?"
FORGET_SESSION = "DELETE FROM session_turns WHERE session_id = ?"
COUNTS = "SELECT COUNT(DISTINCT session_id), COUNT(*) FROM session_turns"
