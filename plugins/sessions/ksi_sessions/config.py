"""The ``[sessions]`` config table."""

from __future__ import annotations

from typing import Any

import attrs


def _positive_or_none(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{a.name} must be a positive integer (leave it out for no limit), got {value!r}")


@attrs.define
class SessionsConfig:
    """``[sessions]``: how much of a conversation a continuing request carries.

    ``max_turns``: the newest turns at most (a turn: one request's own messages and its answer).
    ``max_tokens``: the earlier turns' size at most, estimated (see :func:`ksi_sessions.transcript.estimate`).
    The oldest turns go first, whole; the system (and developer) messages that open the conversation's
    first turn stay, whatever the limits. Left out: no limit.
    """

    max_turns: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_tokens: int | None = attrs.field(default=None, validator=_positive_or_none)
