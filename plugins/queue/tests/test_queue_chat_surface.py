"""The queue stores the whole chat surface (issue 17): a request loaded from the table is the one submitted,
every chat parameter included; a result answered from the table is the one first returned, every field; the
request hash counts what changes the question asked upstream."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
import pytest
from ksi_queue import Plugin, schema
from ksi_queue.store import HASHED_FIELDS, hash_of
from queue_helpers import rows, stored_only

from ksi_host import hookimpl
from ksi_host.chat import PARAMETERS
from ksi_host.errors import RateLimited, ValidationError
from ksi_host.models import ChatDelta, CompletionRequest, ProviderResponse, Usage
from ksi_host.testing import FailOver, FakeProvider, FakeStreamingProvider, ScriptedProviders

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "find a word",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                                           "strict": True}}]


def every_field(rid: str = "all", **kw: Any) -> CompletionRequest:
    """A request that sets every field of CompletionRequest to something other than its default."""
    fields = {
        "model": "m", "request_id": rid, "session_id": "s1", "agent_id": "a1", "originator_agent_id": "a0",
        "purpose": "p", "priority": "high", "timeout_s": 60.0, "metadata": {"k": "v", "n": 2},
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                  {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"é\"}"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "found"}],
        "max_tokens": 100, "temperature": 0.5, "max_completion_tokens": 90, "top_p": 0.9, "stop": ["\n\n", "END"],
        "seed": -(2**63), "presence_penalty": -0.5, "frequency_penalty": 1.5, "logit_bias": {"50256": -100},
        "logprobs": False, "top_logprobs": None, "n": 1, "user": "u-7", "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "lookup"}}, "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"},
                                                                   "strict": True}},
        "reasoning_effort": "low", "verbosity": "high", "service_tier": "flex", "store": True,
        "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
        "prediction": {"type": "content", "content": "guess"}, "web_search_options": {"search_context_size": "low"},
        "prompt_cache_key": "ck", "safety_identifier": "sid", "provider_options": {"extra_body": {"x": [1, 2.5, None]}},
        "continue_session": True,
    }
    fields.update(kw)
    return CompletionRequest(**fields)


def test_the_tables_hold_every_field_of_a_request() -> None:
    """Every field of CompletionRequest has its column (a field added later fails here until it is stored)."""
    # (history is set by a session plugin while the request runs, never submitted: the queue keeps it 0)
    names = {a.name for a in attrs.fields(CompletionRequest)} - {"history"}
    stored = {"request_id", "messages", "metadata", *schema.REQUEST_FIELDS, *schema.DOCUMENTS}
    assert stored == names
    assert set(HASHED_FIELDS) == {"model", "messages", *PARAMETERS, "provider_options", "continue_session"}
    full = every_field()
    assert {a.name for a in attrs.fields(CompletionRequest)
            if getattr(full, a.name) == a.default and a.name not in ("top_logprobs", "history")} == set()  # (top_logprobs needs logprobs)


async def test_a_request_loaded_from_the_table_is_the_one_submitted(make_host: Any, ksi_db_path: Any) -> None:
    """Stored by a host that does not serve, run by the next serving one: the provider gets every field as submitted."""
    submitted = [every_field("all"), every_field("probs", logprobs=True, top_logprobs=5, stop="STOP",
                                                 tool_choice="required", session_id="s2"),
                 CompletionRequest(model="m", messages=[{"role": "user", "content": "plain"}], request_id="plain")]
    stored_only(ksi_db_path)
    async with make_host(Plugin(), serve=False) as host:
        for r in submitted:
            await host.submit(r)
        for r in submitted:  # also as ksi-host show reads it
            assert (await host.request_details(r.request_id))["request"] == r.to_dict()
    provider = FakeProvider("p1")

    class NoEarlierTurns:  # continue_session needs a session plugin: this one has nothing to add
        @hookimpl
        def ksi_prepare_request(self, request: CompletionRequest) -> None:
            return None

    async with make_host(Plugin(), ScriptedProviders(provider), NoEarlierTurns()) as host:
        results = [await host.complete(r) for r in submitted]  # (the ones restored: the same runs)
    assert [r.ok for r in results] == [True, True, True]
    by_id = {r.request_id: r for r in provider.calls}
    assert [by_id[r.request_id] for r in submitted] == submitted
    assert by_id["all"].logprobs is False and by_id["all"].store is True  # booleans, not 0 and 1
    assert rows(ksi_db_path, "SELECT tools_json, stop_json, continue_session FROM ksi_queue_requests JOIN ksi_queue_payloads"
                " USING (seq) WHERE request_id = 'probs'") == [(json.dumps(TOOLS, separators=(",", ":")), '"STOP"', 1)]


async def test_a_result_answered_from_the_table_is_the_one_first_returned(make_host: Any) -> None:
    """A failed attempt, then a tool-call answer with cached and reasoning tokens: every field comes back."""
    answer = ProviderResponse(text="", usage=Usage(10, 5, 15, 0.002, cached_tokens=4, reasoning_tokens=2),
                              model="upstream-m", finish_reason="tool_calls", refusal="partly",
                              tool_calls=[{"id": "c9", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}])
    a = FakeProvider("a", script=[RateLimited("slow down", retry_after=0.0)])
    b = FakeProvider("b", script=[answer])
    request = CompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], request_id="r1", tools=TOOLS)
    async with make_host(Plugin(), ScriptedProviders(a, b), FailOver()) as host:
        first = await host.complete(request)
    async with make_host(Plugin()) as host:  # no provider at all: only the table can answer
        again = await host.complete(request)
        details = await host.request_details("r1")
    assert first.message == {"role": "assistant", "content": None, "tool_calls": [dict(answer.tool_calls[0])],
                             "refusal": "partly"}
    assert (first.finish_reason, first.usage.cached_tokens, first.usage.reasoning_tokens) == ("tool_calls", 4, 2)
    assert [(x.provider, x.error_type) for x in first.attempts] == [("a", "RateLimited"), ("b", None)]
    assert first.submitted_at is not None and first.submitted_at <= first.started_at
    assert again == first
    assert json.dumps(again.to_dict()) == json.dumps(first.to_dict())  # the same document, keys in the same order
    assert details["result"] == first.to_dict() and details["state"] == "ok"


LOGPROBS = {"content": [{"token": "é ", "logprob": -0.25, "bytes": [195, 169, 32],
                         "top_logprobs": [{"token": "é ", "logprob": -0.25, "bytes": [195, 169, 32]}]},
                        {"token": "ok", "logprob": -1.5, "bytes": [111, 107], "top_logprobs": []}], "refusal": None}


async def test_a_result_keeps_its_log_probabilities(make_host: Any, ksi_db_path: Any) -> None:
    """Stored as a document (NULL when not asked) and read back: the same request id answered again, by another
    process, has them, and so has ksi-host show."""
    answer = ProviderResponse(text="é ok", usage=Usage(3, 2, 5), logprobs=LOGPROBS)
    request = {"model": "m", "prompt": "hi", "request_id": "lp", "logprobs": True, "top_logprobs": 1}
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p", script=[answer]))) as host:
        first = await host.complete(request)
    async with make_host(Plugin()) as host:  # no provider at all: only the table can answer
        again = await host.complete(request)
        details = await host.request_details("lp")
    assert first.logprobs == LOGPROBS and again == first
    assert details["result"]["logprobs"] == LOGPROBS
    [(stored,)] = rows(ksi_db_path, "SELECT result_logprobs_json FROM ksi_queue_requests")
    assert json.loads(stored) == LOGPROBS and "é" in stored  # a JSON document, as written


async def test_a_streamed_result_keeps_its_log_probabilities_and_a_stream_answered_from_the_table_has_them(
        make_host: Any) -> None:
    provider = FakeStreamingProvider("p", script=[[
        ChatDelta("é ", logprobs={"content": LOGPROBS["content"][:1], "refusal": None}),
        ChatDelta("ok", logprobs={"content": LOGPROBS["content"][1:], "refusal": None}),
        ChatDelta(finish_reason="stop", usage=Usage(3, 2, 5))]])
    request = {"model": "m", "prompt": "hi", "request_id": "slp", "logprobs": True, "top_logprobs": 1}
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        stream = host.stream(request)
        [d async for d in stream]
        first = stream.result
    async with make_host(Plugin()) as host:  # no provider: the table answers, as one piece
        again = host.stream(request)
        [whole] = [d async for d in again]
    assert first.logprobs == LOGPROBS and again.result == first
    assert whole.content == "é ok" and whole.logprobs == LOGPROBS



async def test_a_result_keeps_its_system_fingerprint_whole_and_streamed(make_host: Any, ksi_db_path: Any) -> None:
    """Stored in its column (NULL when the upstream sent none) and read back: the same request id answered again by
    another process, whole or as a stream, has it, and so has ksi-host show."""
    whole = FakeProvider("p", script=[ProviderResponse("a", system_fingerprint="fp_whole"), "plain"])
    streamed = FakeStreamingProvider("p", script=[[ChatDelta("b", system_fingerprint="fp_old"),
                                                   ChatDelta("c", system_fingerprint="fp_new"),
                                                   ChatDelta(finish_reason="stop")]])
    async with make_host(Plugin(), ScriptedProviders(whole)) as host:
        first = await host.complete({"model": "m", "prompt": "hi", "request_id": "fp", "seed": 7})
        plain = await host.complete({"model": "m", "prompt": "hi", "request_id": "plain"})
    async with make_host(Plugin(), ScriptedProviders(streamed)) as host:
        stream = host.stream({"model": "m", "prompt": "hi", "request_id": "fp-s", "seed": 7})
        [d async for d in stream]
    async with make_host(Plugin()) as host:  # no provider at all: only the table can answer
        again = await host.complete({"model": "m", "prompt": "hi", "request_id": "fp", "seed": 7})
        again_streamed = host.stream({"model": "m", "prompt": "hi", "request_id": "fp-s", "seed": 7})
        [one] = [d async for d in again_streamed]
        again_plain = await host.complete({"model": "m", "prompt": "hi", "request_id": "plain"})
        details = await host.request_details("fp")
    assert first.system_fingerprint == "fp_whole" and again == first and details["result"]["system_fingerprint"] == "fp_whole"
    assert stream.result.system_fingerprint == "fp_new" and again_streamed.result == stream.result
    assert one.content == "bc" and one.system_fingerprint == "fp_new"
    assert plain.system_fingerprint is None and again_plain == plain and "system_fingerprint" not in plain.to_dict()
    assert dict(rows(ksi_db_path, "SELECT request_id, system_fingerprint FROM ksi_queue_requests")) == {
        "fp": "fp_whole", "fp-s": "fp_new", "plain": None}

async def test_a_streamed_result_keeps_its_time_to_first_token(make_host: Any) -> None:
    provider = FakeStreamingProvider("p", script=[["Hel", "lo", ChatDelta(finish_reason="length", usage=Usage(3, 2, 5))]])
    request = {"model": "m", "prompt": "hi", "request_id": "s1"}
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        stream = host.stream(request)
        assert "".join([d.content or "" async for d in stream]) == "Hello"
        first = stream.result
    async with make_host(Plugin()) as host:
        again = await host.complete(request)
    assert first.attempts[0].ttft_ms is not None and first.finish_reason == "length"
    assert again == first


async def test_a_plain_text_answer_is_stored_once(make_host: Any, ksi_db_path: Any) -> None:
    """The message's content is result_text: the message document holds the rest only."""
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p", script=["the answer"]))) as host:
        first = await host.complete({"model": "m", "prompt": "hi", "request_id": "t"})
    assert first.message == {"role": "assistant", "content": "the answer"}
    assert rows(ksi_db_path, "SELECT result_text, result_message_json, result_logprobs_json FROM ksi_queue_requests") == [
        ("the answer", '{"role":"assistant"}', None)]  # no log probabilities asked: NULL
    async with make_host(Plugin()) as host:
        assert await host.complete({"model": "m", "prompt": "hi", "request_id": "t"}) == first


@pytest.mark.parametrize("change", [
    {"tools": [{"type": "function", "function": {"name": "other"}}]},
    {"seed": 7}, {"logprobs": True}, {"stop": "x"}, {"response_format": {"type": "json_object"}},
    {"provider_options": {"extra_body": {"x": 1}}}, {"reasoning_effort": "high"},
    {"continue_session": True, "session_id": "s"},
])
async def test_a_request_id_submitted_again_with_other_chat_parameters_is_refused(make_host: Any,
                                                                                  change: dict[str, Any]) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "request_id": "r0"}
    provider = FakeProvider("p1")
    async with make_host(Plugin(), ScriptedProviders(provider)) as host:
        await host.complete(CompletionRequest(**base))
        differs = ", ".join(k for k in change if k != "session_id")
        with pytest.raises(ValidationError, match=rf"'r0' is already stored with a different request \(differs in {differs}\)"):
            await host.submit(CompletionRequest(**base, **change))
        # who asks and how it is scheduled may differ
        await host.complete(CompletionRequest(**base, metadata={"k": 1}, priority="low", timeout_s=5.0, agent_id="x"))
    assert len(provider.calls) == 1


def test_a_request_setting_no_new_parameter_keeps_the_hash_of_migration_3() -> None:
    """Rows stored before migration 4 hashed model, max_tokens, temperature and the messages: a request that sets
    nothing else hashes the same, so those rows still compare by hash."""
    r = CompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.5,
                          metadata={"k": 1}, session_id="s", priority="low")
    text = 'm\x005\x000.5\x00[{"role":"user","content":"hi"}]'
    assert hash_of(r) == hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    assert hash_of(attrs.evolve(r, seed=1)) != hash_of(r)
    assert hash_of(attrs.evolve(r, logprobs=False)) != hash_of(r)  # false is set: not the same as unset


class Observed:
    """Records the results the observers see."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @hookimpl
    def ksi_request_finished(self, request: CompletionRequest, result: Any) -> None:
        self.seen.append(result)


async def test_the_result_the_observers_see_is_the_one_stored(make_host: Any) -> None:
    observed = Observed()
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("p")), observed) as host:
        first = await host.complete({"model": "m", "prompt": "hi", "request_id": "o"})
    async with make_host(Plugin()) as host:
        again = await host.complete({"model": "m", "prompt": "hi", "request_id": "o"})
    assert observed.seen == [first] == [again]
