"""[sessions] max_turns and max_tokens: the oldest turns go, whole; the first turn's system message stays."""

from __future__ import annotations

from typing import Any

import pytest
from ksi_sessions.plugin import Plugin
from ksi_sessions.transcript import TurnSize, choose, estimate

from ksi_host import ConfigError, ProviderResponse, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

SYSTEM = {"role": "system", "content": "Be brief."}


async def echo(request: Any) -> ProviderResponse:
    return ProviderResponse(f"re: {request.messages[-1]['content']}", usage=Usage(1, 1, 2))


async def conversation(make_host: Any, config: dict[str, Any], turns: int) -> FakeProvider:
    """``turns`` requests in one session (the first with a system message), each but the first continuing."""
    p = FakeProvider("fake", script=[echo])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p), config={"sessions": config}) as host:
        await host.complete({"model": "m", "session_id": "s", "messages": [SYSTEM, {"role": "user", "content": "t1"}]})
        for n in range(2, turns + 1):
            await host.complete({"model": "m", "session_id": "s", "prompt": f"t{n}", "continue_session": True})
    return p


def texts(request: Any) -> list[str]:
    return [m["content"] for m in request.messages]


async def test_max_turns_keeps_the_newest_turns_and_the_first_turn_s_system_message(make_host) -> None:
    p = await conversation(make_host, {"max_turns": 2}, 5)
    assert texts(p.calls[1]) == ["Be brief.", "t1", "re: t1", "t2"]  # the first turn itself fits
    assert texts(p.calls[2]) == ["Be brief.", "t1", "re: t1", "t2", "re: t2", "t3"]
    assert texts(p.calls[4]) == ["Be brief.", "t3", "re: t3", "t4", "re: t4", "t5"]
    assert p.calls[4].history == 5


async def test_max_tokens_keeps_the_newest_turns_that_fit_with_the_system_message(make_host) -> None:
    system = estimate(SYSTEM)
    turn = estimate({"role": "user", "content": "t2"}) + estimate({"role": "assistant", "content": "re: t2"})
    p = await conversation(make_host, {"max_tokens": system + 2 * turn}, 5)
    assert texts(p.calls[4]) == ["Be brief.", "t3", "re: t3", "t4", "re: t4", "t5"]
    p = await conversation(make_host, {"max_tokens": system + 2 * turn - 1}, 5)
    assert texts(p.calls[4]) == ["Be brief.", "t4", "re: t4", "t5"]
    p = await conversation(make_host, {"max_tokens": 1}, 3)  # nothing fits: the system message still goes
    assert texts(p.calls[2]) == ["Be brief.", "t3"] and p.calls[2].history == 1


async def test_without_limits_every_turn_is_carried(make_host) -> None:
    p = await conversation(make_host, {}, 4)
    assert texts(p.calls[3]) == ["Be brief.", "t1", "re: t1", "t2", "re: t2", "t3", "re: t3", "t4"]


def test_choose_counts_turns_and_tokens_from_the_newest() -> None:
    turns = [TurnSize(1, 30), TurnSize(2, 10), TurnSize(3, 10), TurnSize(4, 10)]
    assert choose(turns, 5, max_turns=None, max_tokens=None) == 1
    assert choose(turns, 5, max_turns=3, max_tokens=None) == 2
    assert choose(turns, 5, max_turns=None, max_tokens=35) == 2  # 3 turns of 10 and the system message's 5
    assert choose(turns, 5, max_turns=None, max_tokens=34) == 3
    assert choose(turns, 5, max_turns=None, max_tokens=60) == 1  # the first turn counts its system message itself
    assert choose(turns, 5, max_turns=None, max_tokens=14) is None
    assert choose(turns, 0, max_turns=None, max_tokens=10) == 4


def test_the_estimate_counts_text_calls_and_parts() -> None:
    assert estimate({"role": "user", "content": "12345678"}) == 4 + 2
    assert estimate({"role": "user", "content": "123456789"}) == 4 + 3
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert estimate({"role": "assistant", "content": None, "tool_calls": [call]}) == 4 + 2  # 5 characters
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "data:..." * 1000}}]
    assert estimate({"role": "user", "content": parts}) == 4 + 1 + 256


@pytest.mark.parametrize("table, key", [({"max_turns": 0}, "max_turns"), ({"max_tokens": -5}, "max_tokens"),
                                        ({"max_turns": True}, "max_turns"), ({"max_turn": 3}, "max_turn")])
async def test_bad_limits_stop_start_up_naming_the_key(make_host, table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        async with make_host(Plugin(), config={"sessions": table}):
            pass
