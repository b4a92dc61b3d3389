"""The ``sessions`` plugin: a session's conversation goes on, whichever provider answers.

Hooks:

* ``ksi_request_finished``: an ``ok`` result of a request with a session id
  (the request's, else the one the answer came under) is written to the
  session's transcript as a turn: the request's own messages (without the
  earlier turns it was sent with), then the answer (tool calls included).
  Awaited by the host before the queue stores the result, so the session's
  next request, which the queue starts only after that, finds it. Written
  again for the same request id (a result stored twice after a crash), the
  turn is replaced, never doubled; a final result that is not ok removes a
  turn an earlier run of the same request left.
* ``ksi_prepare_request``: a request with ``continue_session`` is sent with
  the earlier turns of its session's conversation before its own messages
  (``history`` says how many), within ``[sessions] max_turns`` and
  ``max_tokens``. A request of the session without ``continue_session``
  begins a new conversation: the requests that continue after it carry it
  and what follows, not what came before (``show-session`` still prints
  everything).
* ``ksi_cli_commands``: ``ksi-host show-session S`` and ``ksi-host forget-session S``.
* ``ksi_config_spec``, ``ksi_startup`` (the tables), ``ksi_status``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import attrs

from ksi_host import CompletionRequest, CompletionResult, hookimpl

from .config import SessionsConfig
from .store import TranscriptStore

TABLE = "sessions"


class Plugin:
    """One instance per Host: the transcript store on ``host.db``."""

    def __init__(self) -> None:
        self.store: TranscriptStore | None = None

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, SessionsConfig

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        self.store = TranscriptStore(host.db)
        await self.store.migrate()

    @hookimpl
    def ksi_prepare_request(self, host: Any, request: CompletionRequest) -> Awaitable[CompletionRequest | None] | None:
        if not request.continue_session:
            return None  # nothing to read: no coroutine either (every request comes through here)
        return self._continue(host.config[TABLE], request)

    async def _continue(self, config: SessionsConfig, request: CompletionRequest) -> CompletionRequest | None:
        assert self.store is not None and request.session_id is not None  # started; continue_session needs one
        earlier = await self.store.earlier(request.session_id, request.request_id, max_turns=config.max_turns,
                                          max_tokens=config.max_tokens)
        if not earlier:
            return None
        return attrs.evolve(request, messages=[*earlier, *request.messages], history=request.history + len(earlier))

    @hookimpl
    def ksi_request_finished(self, request: CompletionRequest, result: CompletionResult) -> Awaitable[None] | None:
        assert self.store is not None  # started
        session_id = request.session_id or result.session_id
        if session_id is None:
            return None
        if not result.ok:
            return self.store.drop_turn(request.request_id)
        answer = result.message or {"role": "assistant", "content": result.text or ""}
        return self.store.write_turn(session_id, request.request_id, continues=request.continue_session,
                                     messages=[*request.messages[request.history:], answer],
                                     model=result.model, provider=result.provider)

    @hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any] | None:
        if self.store is None:
            return None
        sessions, turns = await self.store.counts()
        config: SessionsConfig = host.config[TABLE]
        return {TABLE: {"sessions": sessions, "turns": turns, "max_turns": config.max_turns,
                        "max_tokens": config.max_tokens}}

    @hookimpl
    def ksi_cli_commands(self) -> list[Any]:
        from .commands import COMMANDS

        return COMMANDS
