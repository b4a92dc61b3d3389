"""Which CLI session continues which host session: the ``claude_cli_sessions`` table (in ``host.db``).

One row per host ``session_id``: the CLI's session id to pass to ``--resume``
next time (the CLI may answer a resumed call under a new id: the row follows
it), the deployment that last ran it, how many calls it had, and when.
"""

from __future__ import annotations

import time
from typing import Any

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
]


class SessionStore:
    """Reads and writes ``claude_cli_sessions`` through ``host.db`` (group-committed writes)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    async def migrate(self) -> None:
        await self.db.migrate(OWNER, MIGRATIONS)

    async def claude_session(self, session_id: str) -> str | None:
        """The CLI session id to resume for host session ``session_id`` (None: a new conversation)."""
        row = await self.db.fetchone("SELECT claude_session_id FROM claude_cli_sessions WHERE session_id = ?", (session_id,))
        return None if row is None else row[0]

    async def save(self, session_id: str, claude_session_id: str, deployment: str) -> None:
        """Record that ``session_id`` continues in CLI session ``claude_session_id`` (durable on return)."""
        now = time.time()
        await self.db.execute(
            "INSERT INTO claude_cli_sessions (session_id, claude_session_id, deployment, calls, created_at, updated_at)"
            " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (session_id) DO UPDATE SET"
            " claude_session_id = excluded.claude_session_id, deployment = excluded.deployment,"
            " calls = calls + 1, updated_at = excluded.updated_at",
            (session_id, claude_session_id, deployment, now, now),
        )

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM claude_cli_sessions")
        return int(row[0]) if row is not None else 0
