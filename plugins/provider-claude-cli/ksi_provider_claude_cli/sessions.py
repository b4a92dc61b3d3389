"""Which CLI session continues which host session: the ``claude_cli_sessions`` table (in ``host.db``).

One row per host ``session_id``: the CLI's session id to pass to ``--resume``
next time (the CLI may answer a resumed call under a new id: the row follows
it), what that CLI session has seen (``seen``: :func:`~ksi_provider_claude_cli.cli.seen_hash`
of the conversation up to its last answer, so that it is resumed only for a
request whose earlier turns are exactly those: not when a turn was answered by
another provider or another host), the deployment that last ran it, how many
calls it had, and when.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

OWNER = "claude_cli"
MIGRATIONS = [
    """
    CREATE TABLE claude_cli_sessions (
        session_id TEXT PRIMARY KEY,            -- the host's session id
        claude_session_id TEXT NOT NULL,        -- the CLI's session id, for --resume
        deployment TEXT NOT NULL,               -- the deployment that ran its last call
        calls INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,               -- unix seconds
        updated_at REAL NOT NULL
    )
    """,
    # what the CLI session has seen (NULL in rows written before: never resumed, the whole conversation is sent)
    "ALTER TABLE claude_cli_sessions ADD COLUMN seen TEXT",
]


class CliSession(NamedTuple):
    """The CLI session that continues a host session, and the hash of the conversation it has seen."""

    claude_session_id: str
    seen: str | None


class SessionStore:
    """Reads and writes ``claude_cli_sessions`` through ``host.db`` (group-committed writes)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    async def migrate(self) -> None:
        await self.db.migrate(OWNER, MIGRATIONS)

    async def claude_session(self, session_id: str) -> CliSession | None:
        """The CLI session that continues host session ``session_id`` (None: none yet)."""
        row = await self.db.fetchone("SELECT claude_session_id, seen FROM claude_cli_sessions WHERE session_id = ?",
                                     (session_id,))
        return None if row is None else CliSession(row[0], row[1])

    async def save(self, session_id: str, claude_session_id: str, deployment: str, seen: str) -> None:
        """Record that ``session_id`` continues in CLI session ``claude_session_id``, which has seen the
        conversation whose hash is ``seen`` (durable on return)."""
        now = time.time()
        await self.db.execute(
            "INSERT INTO claude_cli_sessions (session_id, claude_session_id, seen, deployment, calls, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT (session_id) DO UPDATE SET"
            " claude_session_id = excluded.claude_session_id, seen = excluded.seen, deployment = excluded.deployment,"
            " calls = calls + 1, updated_at = excluded.updated_at",
            (session_id, claude_session_id, seen, deployment, now, now),
        )

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM claude_cli_sessions")
        return int(row[0]) if row is not None else 0
