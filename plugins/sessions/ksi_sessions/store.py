"""The transcripts in ``host.db``: writing a turn, reading what a continuing request carries, showing, forgetting."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from . import schema, transcript
from .transcript import TurnSize


class TranscriptStore:
    """Reads and writes ``session_turns`` and ``session_messages`` through the host's database helper."""

    def __init__(self, db: Any) -> None:
        self.db = db

    async def migrate(self) -> None:
        await self.db.migrate(schema.OWNER, schema.MIGRATIONS)

    async def write_turn(self, session_id: str, request_id: str, *, continues: bool, messages: Sequence[dict[str, Any]],
                         model: str | None, provider: str | None) -> None:
        """Record ``messages`` (the request's own, then its answer) as the turn of ``request_id``: the session's
        next turn, or the same turn again when the request has one already. One transaction, durable on return."""
        sizes = [transcript.estimate(m) for m in messages]
        statements: list[tuple[str, Any]] = [
            (schema.DELETE_MESSAGES, (request_id,)),
            (schema.UPSERT_TURN, (session_id, request_id, int(continues), len(messages), sum(sizes), model, provider,
                                  time.time())),
        ]
        statements += [(schema.INSERT_MESSAGE, (position, *transcript.to_row(m), size, request_id))
                       for position, (m, size) in enumerate(zip(messages, sizes, strict=True))]
        await self.db.write_batch(statements)

    async def drop_turn(self, request_id: str) -> None:
        """Forget the turn of ``request_id``, if it has one (its final result is not ok after all)."""
        if await self.db.fetchone(schema.HAS_TURN, (request_id,)) is not None:
            await self.db.execute(schema.DELETE_TURN, (request_id,))

    async def earlier(self, session_id: str, request_id: str, *, max_turns: int | None,
                      max_tokens: int | None) -> list[dict[str, Any]]:
        """The messages request ``request_id`` of ``session_id`` is sent with before its own: the earlier turns of
        the conversation it continues, oldest first, within the limits (see :func:`transcript.choose`)."""
        turns = [TurnSize(r["turn"], r["tokens"])
                 for r in await self.db.fetchall(schema.CONVERSATION_TURNS, (session_id, request_id))]
        if not turns:
            return []
        opening: list[dict[str, Any]] = []
        if max_turns is not None or max_tokens is not None:
            first_turn = await self.db.fetchall(schema.MESSAGES_OF_TURN, (session_id, turns[0].turn))
            opening = transcript.leading_system([transcript.from_row(r) for r in first_turn])
        first = transcript.choose(turns, sum(transcript.estimate(m) for m in opening),
                                  max_turns=max_turns, max_tokens=max_tokens)
        if first is None:
            return opening
        kept = [transcript.from_row(r) for r in await self.db.fetchall(schema.MESSAGES_FROM, (session_id, first, request_id))]
        return kept if first == turns[0].turn else opening + kept

    async def session(self, session_id: str) -> list[dict[str, Any]]:
        """Every turn of ``session_id``, oldest first: its columns and its ``messages``."""
        turns = [dict(r) for r in await self.db.fetchall(schema.TURNS_OF_SESSION, (session_id,))]
        by_turn: dict[int, list[dict[str, Any]]] = {t["turn"]: [] for t in turns}
        for r in await self.db.fetchall(schema.ALL_MESSAGES_OF_SESSION, (session_id,)):
            by_turn[r["turn"]].append(transcript.from_row(r))
        for t in turns:
            t["continues"] = bool(t["continues"])
            t["messages"] = by_turn[t["turn"]]
        return turns

    async def forget(self, session_id: str) -> int:
        """Forget the transcript of ``session_id`` (durable on return); return how many turns it had."""
        row = await self.db.fetchone(schema.TURN_COUNT, (session_id,))
        await self.db.execute(schema.FORGET_SESSION, (session_id,))
        return int(row[0])

    async def counts(self) -> tuple[int, int]:
        """How many sessions have a transcript, and how many turns they hold."""
        row = await self.db.fetchone(schema.COUNTS)
        return (int(row[0]), int(row[1])) if row is not None else (0, 0)
