"""ksi-sessions through a Host with the testing kit's fakes: what each turn of a conversation is sent with."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ksi_sessions.plugin import Plugin
from ksi_sessions.transcript import estimate

from ksi_host import CompletionRequest, ProviderResponse, RateLimited, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


async def echo(request: Any) -> ProviderResponse:
    """An answer naming the last message it got, so each turn's answer is its own."""
    return ProviderResponse(f"re: {request.messages[-1]['content']}", usage=Usage(1, 1, 2))


def fake() -> FakeProvider:
    return FakeProvider("fake", script=[echo])


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def test_each_continuing_turn_is_sent_after_the_earlier_turns_and_their_answers(make_host) -> None:
    p = fake()
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        r1 = await host.complete({"model": "m", "session_id": "s1", "messages": [SYSTEM, user("My name is Ada.")]})
        r2 = await host.complete({"model": "m", "session_id": "s1", "prompt": "Name?", "continue_session": True})
        r3 = await host.complete({"model": "m", "session_id": "s1", "prompt": "Again?", "continue_session": True})
    assert [r.text for r in (r1, r2, r3)] == ["re: My name is Ada.", "re: Name?", "re: Again?"]
    first, second, third = p.calls
    assert list(first.messages) == [SYSTEM, user("My name is Ada.")] and first.history == 0
    assert list(second.messages) == [SYSTEM, user("My name is Ada."), answer("re: My name is Ada."), user("Name?")]
    assert second.history == 3
    assert list(third.messages) == [*second.messages, answer("re: Name?"), user("Again?")] and third.history == 5


async def test_without_continue_session_nothing_is_added(make_host) -> None:
    p = fake()
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "prompt": "one"})
        await host.complete({"model": "m", "session_id": "s1", "prompt": "two"})
        await host.complete({"model": "m", "prompt": "no session"})
    assert [list(c.messages) for c in p.calls] == [[user("one")], [user("two")], [user("no session")]]
    assert all(c.history == 0 for c in p.calls)


async def test_a_request_that_does_not_continue_begins_a_new_conversation(make_host, ksi_db_path) -> None:
    p = fake()
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "prompt": "old topic"})
        await host.complete({"model": "m", "session_id": "s1", "prompt": "new topic"})
        await host.complete({"model": "m", "session_id": "s1", "prompt": "more", "continue_session": True})
        await host.complete({"model": "m", "session_id": "s2", "prompt": "other session", "continue_session": True})
    assert list(p.calls[2].messages) == [user("new topic"), answer("re: new topic"), user("more")]
    assert list(p.calls[3].messages) == [user("other session")]  # nothing earlier in s2: sent as it is
    # every ok turn is kept (show-session prints them all), numbered in the session
    assert rows(ksi_db_path, "SELECT session_id, turn, continues FROM session_turns ORDER BY session_id, turn") == [
        ("s1", 1, 0), ("s1", 2, 0), ("s1", 3, 1), ("s2", 1, 1)]


async def test_a_tool_call_conversation_goes_on_with_the_calls_and_their_results(make_host) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    p = FakeProvider("fake", script=[
        ProviderResponse("", tool_calls=[call], finish_reason="tool_calls"),
        ProviderResponse("It is 18 C in Paris."),
        echo,
    ])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        r1 = await host.complete({"model": "m", "session_id": "t", "prompt": "Weather in Paris?", "tools": tools})
        assert r1.finish_reason == "tool_calls"
        result = {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
        await host.complete({"model": "m", "session_id": "t", "messages": [result], "tools": tools,
                             "continue_session": True})
        await host.complete({"model": "m", "session_id": "t", "prompt": "Thanks!", "continue_session": True})
    tool_turn = [user("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [call]}, result]
    assert list(p.calls[1].messages) == tool_turn and p.calls[1].history == 2
    assert list(p.calls[2].messages) == [*tool_turn, answer("It is 18 C in Paris."), user("Thanks!")]


async def test_only_ok_turns_enter_the_transcript(make_host, ksi_db_path) -> None:
    p = FakeProvider("fake", script=[echo, RateLimited("slow down"), echo])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "prompt": "one"})
        failed = await host.complete({"model": "m", "session_id": "s1", "prompt": "lost", "continue_session": True})
        assert failed.status == "error"
        await host.complete({"model": "m", "session_id": "s1", "prompt": "three", "continue_session": True})
    assert list(p.calls[2].messages) == [user("one"), answer("re: one"), user("three")]
    assert rows(ksi_db_path, "SELECT turn FROM session_turns") == [(1,), (2,)]


async def test_a_result_written_twice_replaces_its_turn_and_a_rerun_is_not_sent_with_its_own_turn(
    make_host, ksi_db_path
) -> None:
    """A crash between the transcript write and the queue's store runs the request again: one turn, never two,
    holding the answer of the run whose result is stored."""
    p = FakeProvider("fake", script=[echo, echo, ProviderResponse("the rerun's answer is longer", usage=Usage(1, 1, 2))])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "prompt": "one", "request_id": "r1"})
        again = CompletionRequest.from_dict({"model": "m", "session_id": "s1", "prompt": "two",
                                             "continue_session": True, "request_id": "r2"})
        first = await host.execute(again)
        second = await host.execute(again)  # the same request run again (as after a crash)
        assert first.ok and second.ok
        await host.request_finished(again, second)  # and its result reported once more
    assert list(p.calls[2].messages) == [user("one"), answer("re: one"), user("two")]  # not its own earlier turn
    tokens = estimate(user("two")) + estimate(answer("the rerun's answer is longer"))
    assert rows(ksi_db_path, "SELECT turn, request_id, messages, tokens FROM session_turns ORDER BY turn") == [
        (1, "r1", 2, estimate(user("one")) + estimate(answer("re: one"))), (2, "r2", 2, tokens)]
    assert rows(ksi_db_path, "SELECT turn, position, content FROM session_messages ORDER BY turn, position") == [
        (1, 0, "one"), (1, 1, "re: one"), (2, 0, "two"), (2, 1, "the rerun's answer is longer")]


async def test_a_request_that_fails_on_its_rerun_leaves_no_turn(make_host, ksi_db_path) -> None:
    p = FakeProvider("fake", script=[echo, RateLimited("slow down")])
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        request = CompletionRequest.from_dict({"model": "m", "session_id": "s1", "prompt": "one", "request_id": "r1"})
        assert (await host.execute(request)).ok
        assert rows(ksi_db_path, "SELECT COUNT(*) FROM session_messages") == [(2,)]
        assert (await host.execute(request)).status == "error"  # its stored result will be this one
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM session_turns") == [(0,)]
    assert rows(ksi_db_path, "SELECT COUNT(*) FROM session_messages") == [(0,)]


async def test_the_turn_is_durable_when_the_result_is_handed_out(make_host, ksi_db_path) -> None:
    p = fake()
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(p)) as host:
        await host.complete({"model": "m", "session_id": "s1", "prompt": "one"})
        # another connection (another process, or this one after a kill) already reads it
        assert rows(ksi_db_path, "SELECT role, content FROM session_messages ORDER BY position") == [
            ("user", "one"), ("assistant", "re: one")]


async def test_status_counts_sessions_and_turns(make_host) -> None:
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(fake()), config={"sessions": {"max_turns": 3}}) as host:
        for s in ("a", "a", "b"):
            await host.complete({"model": "m", "session_id": s, "prompt": "x"})
        status = (await host.status())["sessions"]
    assert status == {"sessions": 2, "turns": 3, "max_turns": 3, "max_tokens": None}
