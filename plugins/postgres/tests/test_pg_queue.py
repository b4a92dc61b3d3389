"""The queue on one host: order, priorities, durability, idempotent ids, cancels, the chat surface, reads."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import pg_config
from ksi_postgres.plugin import Plugin
from pg_helpers import Gate, answered, rows, until

import ksi_host
from ksi_host.errors import ProviderUnavailable, ValidationError
from ksi_host.models import ChatDelta, CompletionResult, FailureDecision, ProviderResponse, RequestQuery, Usage
from ksi_host.testing import FakeProvider, FakeStreamingProvider, ScriptedProviders


async def test_sessions_run_in_order_one_at_a_time_and_priority_picks_among_sessions(make_host, pg_env) -> None:
    order: list[str] = []
    running: dict[str, int] = {}

    async def record(request):
        sid = request.session_id
        running[sid] = running.get(sid, 0) + 1
        assert running[sid] == 1, f"two requests of {sid} ran at once"
        order.append(request.request_id)
        await asyncio.sleep(0.002)
        running[sid] -= 1
        return await answered(request)

    gate = Gate()
    provider = FakeProvider("a", script=[gate, record])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config(concurrency=1)) as host:
        first = await host.submit({"model": "m", "prompt": "block", "request_id": "block"})
        await until(lambda: gate.arrived, what="the first request to run")
        tickets = []
        for i in range(6):  # while the only slot is taken: the next ones are chosen by priority, then order
            for sid, prio in (("a", "low"), ("b", "high")):
                tickets.append(await host.submit({"model": "m", "prompt": f"{sid}{i}", "request_id": f"{sid}{i}",
                                                  "session_id": sid, "priority": prio}))
        gate.open()
        results = [await t.result() for t in [first, *tickets]]
    assert all(r.ok for r in results)
    assert order == [f"b{i}" for i in range(6)] + [f"a{i}" for i in range(6)]


async def test_many_sessions_at_once_keep_their_order(make_host, pg_env) -> None:
    seen: dict[str, list[int]] = {}
    active: set[str] = set()

    async def record(request):
        sid, k = request.session_id, int(request.request_id.split("-")[1])
        assert sid not in active, f"two requests of {sid} ran at once"
        active.add(sid)
        await asyncio.sleep(0.001)
        seen.setdefault(sid, []).append(k)
        active.discard(sid)
        return await answered(request)

    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[record])), config=pg_config(concurrency=8)) as host:
        reqs = [{"model": "m", "prompt": f"q{i}", "request_id": f"s{i % 20}-{i // 20}", "session_id": f"s{i % 20}"}
                for i in range(400)]
        results = await asyncio.gather(*[host.complete(r) for r in reqs])
    assert all(r.ok for r in results)
    assert all(ks == sorted(ks) and len(ks) == 20 for ks in seen.values()) and len(seen) == 20


async def test_a_request_is_durable_before_submit_returns(make_host, pg_env) -> None:
    gate = Gate()
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[gate])), config=pg_config()) as host:
        await host.submit({"model": "m", "prompt": "hi", "request_id": "durable"})
        found = await rows(pg_env, "SELECT status FROM ksi_pg_requests WHERE request_id = 'durable'")
        assert len(found) == 1 and found[0]["status"] in ("queued", "running")
        gate.open()


async def test_a_stored_final_result_answers_a_resubmission_and_never_runs_again(make_host, pg_env) -> None:
    provider = FakeProvider("a", script=[answered])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config()) as host:
        first = await host.complete({"model": "m", "prompt": "hi", "request_id": "once", "session_id": "s"})
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config()) as host:
        again = await host.complete({"model": "m", "prompt": "hi", "request_id": "once", "session_id": "other"})
        with pytest.raises(ValidationError, match=r"'once' is already stored with a different request \(differs in messages\)"):
            await host.submit({"model": "m", "prompt": "something else", "request_id": "once"})
        with pytest.raises(ValidationError, match=r"differs in temperature"):
            await host.submit({"model": "m", "prompt": "hi", "request_id": "once", "temperature": 0.5})
    assert len(provider.calls) == 1
    assert again == first and again.attempts == first.attempts and again.submitted_at == first.submitted_at


async def test_the_same_id_submitted_twice_while_queued_is_one_run(make_host, pg_env) -> None:
    gate = Gate()
    provider = FakeProvider("a", script=[gate])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config()) as host:
        a, b = await asyncio.gather(host.submit({"model": "m", "prompt": "x", "request_id": "dup"}),
                                    host.submit({"model": "m", "prompt": "x", "request_id": "dup"}))
        gate.open()
        ra, rb = await a.result(), await b.result()
    assert ra == rb and len(provider.calls) == 1


async def test_the_chat_surface_is_stored_and_comes_back_whole(make_host, pg_env) -> None:
    request = {
        "model": "m", "request_id": "chat", "session_id": "s", "agent_id": "ag", "originator_agent_id": "boss",
        "purpose": "p", "priority": "high", "timeout_s": 30, "metadata": {"k": "v", "n": 2},
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "what is in it?"},
                                                  {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": "auto", "response_format": {"type": "json_object"}, "stop": ["\n\n", "END"], "seed": 2**40,
        "temperature": 0.3, "top_p": 0.9, "max_tokens": 100, "logit_bias": {"50256": -100}, "user": "u1",
        "reasoning_effort": "low", "provider_options": {"x": [1, {"y": None}]}, "continue_session": False,
    }
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a")), config=pg_config(), serve=False) as reader:
        await reader.submit(request)  # stored by a process that does not serve; a serving host runs it
        details = await reader.request_details("chat")
    provider = FakeProvider("a", script=[answered])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config()):
        await until(lambda: provider.calls, what="the stored request to run")
        ran = provider.calls[0]
    from ksi_host.models import CompletionRequest

    assert ran == CompletionRequest.from_dict(request)
    assert details["request"] == CompletionRequest.from_dict(request).to_dict() and details["state"] == "queued"


async def test_cancel_and_clear_session_from_a_process_that_does_not_serve(make_host, pg_env) -> None:
    gate = Gate()
    provider = FakeProvider("a", script=[gate])
    async with make_host(Plugin(), ScriptedProviders(provider), config=pg_config(concurrency=1)) as host:
        running = await host.submit({"model": "m", "prompt": "r", "request_id": "running", "session_id": "s"})
        queued = [await host.submit({"model": "m", "prompt": f"q{i}", "request_id": f"q{i}", "session_id": "s"})
                  for i in range(3)]
        other = await host.submit({"model": "m", "prompt": "o", "request_id": "other", "session_id": "t"})
        await until(lambda: gate.arrived == ["running"], what="the first request to run")
        async with make_host(Plugin(), config=pg_config(), serve=False) as cli:
            assert await cli.cancel("q0") is True
            assert await cli.clear_session("s") == 2
            assert await cli.cancel("q0") is False
            assert await cli.cancel("nobody") is False
            assert await cli.cancel("other") is True  # queued behind the slot
            cancelled = await asyncio.wait_for(cli.cancel("running"), 10)  # running on the host: it stops it
            assert cancelled is True
        results = [await t.result() for t in [running, *queued, other]]
    assert [r.status for r in results] == ["cancelled"] * 5
    assert gate.arrived == ["running"]  # nothing queued reached the provider
    ledger = await rows(pg_env, "SELECT request_id, outcome FROM ksi_pg_token_usage")
    assert [(r["request_id"], r["outcome"]) for r in ledger] == [("running", "unknown")]


class SwitchOnFailure:
    """A failure policy: every failed attempt is retried at once on another provider."""

    @ksi_host.hookimpl
    def ksi_handle_failure(self) -> FailureDecision:
        return FailureDecision.retry(0, switch_provider=True)


async def test_a_request_cancelled_mid_call_keeps_its_attempts_and_provider(make_host, pg_env) -> None:
    """The attempt that failed before, then the one cut short (Cancelled), in order, with the last one's provider:
    in the result the ticket gets and in the one stored (read by a process that does not serve)."""
    gate = Gate()
    first = FakeProvider("first", script=[ProviderUnavailable("upstream answered 500", provider="first")])
    second = FakeProvider("second", script=[gate])
    async with make_host(Plugin(), ScriptedProviders(first, second), SwitchOnFailure(), config=pg_config()) as host:
        ticket = await host.submit({"model": "m", "prompt": "r", "request_id": "r0"})
        await until(lambda: gate.arrived, what="the second attempt to run")
        async with make_host(Plugin(), config=pg_config(), serve=False) as cli:
            assert await asyncio.wait_for(cli.cancel("r0"), 10) is True
            got = await ticket.result()
            stored = CompletionResult.from_dict((await cli.request_details("r0"))["result"])
    for result in (got, stored):
        assert result.status == "cancelled" and result.provider == "second"
        assert [(a.number, a.provider, a.error_type) for a in result.attempts] == [
            (1, "first", "ProviderUnavailable"), (2, "second", "Cancelled")]


async def test_status_details_and_list_read_the_database(make_host, pg_env) -> None:
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[answered])), config=pg_config()) as host:
        for i in range(5):
            await host.complete({"model": "m" if i % 2 else "n", "prompt": f"q{i}", "request_id": f"r{i}",
                                 "session_id": "s", "agent_id": f"ag{i % 2}"})
        status = await host.status()
        listed = await host.list_requests(RequestQuery(limit=3))
        by_agent = await host.list_requests(RequestQuery(agent_id="ag1"))
        details = await host.request_details("r1")
        usage = await host.usage_report("agent")
    assert status["queue"]["queued"] == 0 and status["usage"]["calls"] == 5
    assert [h["state"] for h in status["hosts"]] == ["alive"] and status["hosts"][0]["this"]
    assert [r["request_id"] for r in listed] == ["r4", "r3", "r2"] and listed[0]["attempts"] == 1
    assert [r["request_id"] for r in by_agent] == ["r3", "r1"]
    assert details["state"] == "ok" and details["result"]["text"] == "answer to r1" and len(details["calls"]) == 1
    assert {r["key"]: r["calls"] for r in usage} == {"ag0": 3, "ag1": 2}


async def test_drain_finishes_the_running_and_starts_nothing_more(make_host, pg_env) -> None:
    gate = Gate()
    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[gate])), config=pg_config(concurrency=1)) as host:
        first = await host.submit({"model": "m", "prompt": "1", "request_id": "d1"})
        second = await host.submit({"model": "m", "prompt": "2", "request_id": "d2"})
        await until(lambda: gate.arrived, what="the first request to run")
        drained = asyncio.ensure_future(host.drain())
        await asyncio.sleep(0.1)
        assert not drained.done()
        gate.open()
        await drained
        assert (await first.result()).ok and not second.is_done()
        await asyncio.sleep(0.2)
        assert gate.arrived == ["d1"]
    state = await rows(pg_env, "SELECT request_id, status FROM ksi_pg_requests ORDER BY seq")
    assert [(r["request_id"], r["status"]) for r in state] == [("d1", "ok"), ("d2", "queued")]


async def test_model_limits_hold_on_a_host(make_host, pg_env) -> None:
    running = {"m": 0, "n": 0}
    peak = {"m": 0, "n": 0}

    async def record(request):
        running[request.model] += 1
        peak[request.model] = max(peak[request.model], running[request.model])
        await asyncio.sleep(0.01)
        running[request.model] -= 1
        return await answered(request)

    async with make_host(Plugin(), ScriptedProviders(FakeProvider("a", script=[record])),
                         config=pg_config(concurrency=6, model_limits={"m": 2})) as host:
        results = await asyncio.gather(*[host.complete({"model": "m" if i % 2 else "n", "prompt": f"{i}"})
                                         for i in range(60)])
    assert all(r.ok for r in results) and peak["m"] == 2 and peak["n"] >= 3


LOGPROBS = {"content": [{"token": "é ", "logprob": -0.25, "bytes": [195, 169, 32],
                         "top_logprobs": [{"token": "é ", "logprob": -0.25, "bytes": [195, 169, 32]}]},
                        {"token": "ok", "logprob": -1.5, "bytes": [111, 107], "top_logprobs": []}], "refusal": None}


async def test_a_result_keeps_its_log_probabilities_whole_and_streamed(make_host, pg_env) -> None:
    whole = FakeProvider("a", script=[ProviderResponse("é ok", Usage(3, 2, 5), logprobs=LOGPROBS), "plain"])
    streamed = FakeStreamingProvider("a", script=[[
        ChatDelta("é ", logprobs={"content": LOGPROBS["content"][:1], "refusal": None}),
        ChatDelta("ok", logprobs={"content": LOGPROBS["content"][1:], "refusal": None}), ChatDelta(finish_reason="stop")]])
    asked = {"model": "m", "prompt": "hi", "logprobs": True, "top_logprobs": 1}
    async with make_host(Plugin(), ScriptedProviders(whole), config=pg_config()) as host:
        first = await host.complete({**asked, "request_id": "lp"})
        plain = await host.complete({"model": "m", "prompt": "hi", "request_id": "plain"})
    async with make_host(Plugin(), ScriptedProviders(streamed), config=pg_config()) as host:
        stream = host.stream({**asked, "request_id": "lp-s"})
        [d async for d in stream]
    async with make_host(Plugin(), config=pg_config()) as host:  # no provider: only the database can answer
        again = await host.complete({**asked, "request_id": "lp"})
        again_streamed = await host.complete({**asked, "request_id": "lp-s"})
        details = await host.request_details("lp")
    assert first.logprobs == LOGPROBS and again == first and details["result"]["logprobs"] == LOGPROBS
    assert stream.result.logprobs == LOGPROBS and again_streamed == stream.result
    assert plain.logprobs is None and "logprobs" not in plain.to_dict()
    stored = {r["request_id"]: r["result_logprobs"] for r in await rows(pg_env, "SELECT request_id, result_logprobs"
                                                                                 " FROM ksi_pg_requests")}
    assert stored["plain"] is None and json.loads(stored["lp"]) == LOGPROBS  # NULL when not asked; a JSON document


async def test_a_result_keeps_its_system_fingerprint_whole_and_streamed(make_host, pg_env) -> None:
    whole = FakeProvider("a", script=[ProviderResponse("a", system_fingerprint="fp_whole"), "plain"])
    streamed = FakeStreamingProvider("a", script=[[ChatDelta("b", system_fingerprint="fp_old"),
                                                   ChatDelta("c", system_fingerprint="fp_new"), ChatDelta(finish_reason="stop")]])
    asked = {"model": "m", "prompt": "hi", "seed": 7}
    async with make_host(Plugin(), ScriptedProviders(whole), config=pg_config()) as host:
        first = await host.complete({**asked, "request_id": "fp"})
        plain = await host.complete({"model": "m", "prompt": "hi", "request_id": "plain"})
    async with make_host(Plugin(), ScriptedProviders(streamed), config=pg_config()) as host:
        stream = host.stream({**asked, "request_id": "fp-s"})
        [d async for d in stream]
    async with make_host(Plugin(), config=pg_config()) as host:  # no provider: only the database can answer
        again = await host.complete({**asked, "request_id": "fp"})
        again_streamed = host.stream({**asked, "request_id": "fp-s"})
        [one] = [d async for d in again_streamed]
        again_plain = await host.complete({"model": "m", "prompt": "hi", "request_id": "plain"})
        details = await host.request_details("fp")
    assert first.system_fingerprint == "fp_whole" and again == first and details["result"]["system_fingerprint"] == "fp_whole"
    assert stream.result.system_fingerprint == "fp_new" and again_streamed.result == stream.result
    assert one.system_fingerprint == "fp_new"
    assert plain.system_fingerprint is None and again_plain == plain and "system_fingerprint" not in plain.to_dict()
    stored = {r["request_id"]: r["system_fingerprint"] for r in await rows(pg_env, "SELECT request_id, system_fingerprint"
                                                                                   " FROM ksi_pg_requests")}
    assert stored == {"fp": "fp_whole", "fp-s": "fp_new", "plain": None}
