"""host.stream: pieces as they arrive, one attempt loop, retries only before the first piece, honest failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ksi_host import ChatDelta, ProviderUnavailable, RateLimited, Usage, hookimpl
from ksi_host.testing import DirectQueue, FailOver, FakeProvider, FakeStreamingProvider, ScriptedProviders, UsageCalls


async def collect(stream: Any) -> list[ChatDelta]:
    return [d async for d in stream]


async def test_pieces_arrive_before_the_upstream_finishes(make_host: Any) -> None:
    seen_first = asyncio.Event()
    p = FakeStreamingProvider("p", script=[["Hel", seen_first.wait(), "lo"]], usage=Usage(3, 2, 5))
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        got = []
        async for delta in stream:
            got.append(delta)
            if delta.content == "Hel":
                seen_first.set()  # the provider holds "lo" until the consumer has "Hel"
    assert [d.content for d in got] == ["Hel", "lo", None] and got[-1].finish_reason == "stop"
    r = stream.result
    assert r.ok and r.text == "Hello" and r.finish_reason == "stop" and r.usage == Usage(3, 2, 5)
    assert r.attempts[0].ttft_ms is not None and r.attempts[0].ttft_ms <= r.attempts[0].latency_ms


async def test_failover_happens_before_the_first_piece(make_host: Any) -> None:
    a = FakeStreamingProvider("a", script=[[RateLimited("slow")]])
    b = FakeStreamingProvider("b", script=[["from b"]])
    async with make_host(DirectQueue(), ScriptedProviders(a, b), FailOver()) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        pieces = await collect(stream)
    assert pieces[0].content == "from b"
    assert [(x.provider, x.error_type) for x in stream.result.attempts] == [("a", "RateLimited"), ("b", None)]


async def test_a_failure_after_the_first_piece_ends_the_stream_with_that_error_and_no_retry(make_host: Any) -> None:
    a = FakeStreamingProvider("a", script=[["partial ", ProviderUnavailable("connection reset", provider="a")]])
    b = FakeStreamingProvider("b")
    ledger = UsageCalls()
    async with make_host(DirectQueue(), ScriptedProviders(a, b), FailOver(), ledger) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        got = []
        with pytest.raises(ProviderUnavailable, match="connection reset"):
            async for delta in stream:
                got.append(delta.content)
    assert got == ["partial "] and not b.calls  # no retry once a piece was handed out
    r = stream.result
    assert r.status == "error" and r.text == "partial " and len(r.attempts) == 1
    assert [c.outcome for c in ledger.calls] == ["ProviderUnavailable"]


async def test_a_stream_cut_without_a_finish_reason_is_an_error_not_a_clean_end(make_host: Any) -> None:
    p = FakeStreamingProvider("p", script=[["half an ans", FakeStreamingProvider.CUT]])
    async with make_host(DirectQueue(), ScriptedProviders(p), FailOver()) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        with pytest.raises(ProviderUnavailable, match="no finish_reason"):
            await collect(stream)
    assert stream.result.status == "error" and stream.result.text == "half an ans" and len(p.calls) == 1


async def test_a_cut_before_any_piece_is_retried(make_host: Any) -> None:
    p = FakeStreamingProvider("p", script=[[FakeStreamingProvider.CUT], ["whole"]])
    async with make_host(DirectQueue(), ScriptedProviders(p, FakeStreamingProvider("q", script=[["from q"]])),
                         FailOver()) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        assert [d.content for d in await collect(stream)][0] == "from q"
    assert stream.result.ok and stream.result.attempts[0].error_type == "ProviderUnavailable"


async def test_the_consumer_leaving_closes_the_upstream_and_stores_a_cancelled_result(make_host: Any) -> None:
    forever = asyncio.Event()
    p = FakeStreamingProvider("p", script=[["one ", "two ", forever.wait(), "never"]])
    finished: list[Any] = []

    class Watch:
        @hookimpl
        def ksi_request_finished(self, result: Any) -> None:
            finished.append(result)

    async with make_host(DirectQueue(), ScriptedProviders(p), Watch()) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        pieces = aiter(stream)
        assert (await anext(pieces)).content == "one "
        assert (await anext(pieces)).content == "two "
        await pieces.aclose()  # what `break` does, once the iterator is collected
        for _ in range(100):
            if finished:
                break
            await asyncio.sleep(0.01)
    assert p.closed == 1  # the upstream call was closed
    (r,) = finished
    assert r.status == "cancelled" and r.text == "one two " and r.error["type"] == "ConsumerGone"


async def test_a_provider_without_stream_serves_a_streamed_request_as_one_piece(make_host: Any) -> None:
    p = FakeProvider("p", script=["whole answer"], usage=Usage(4, 2, 6))
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        (piece,) = await collect(stream)
    assert piece == ChatDelta("whole answer", None, "stop", Usage(4, 2, 6), None)
    assert stream.result.text == "whole answer"


async def test_tool_call_pieces_are_assembled_into_the_results_message(make_host: Any) -> None:
    pieces = [ChatDelta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]),
              ChatDelta(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
              ChatDelta(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
              ChatDelta(finish_reason="tool_calls", usage=Usage(9, 4, 13))]
    p = FakeStreamingProvider("p", script=[pieces])
    ledger = UsageCalls()
    async with make_host(DirectQueue(), ScriptedProviders(p), ledger) as host:
        stream = host.stream({"model": "m", "prompt": "weather?"})
        await collect(stream)
    r = stream.result
    assert r.finish_reason == "tool_calls" and r.text is None
    assert r.message["tool_calls"] == [{"id": "call_1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert ledger.calls[0].usage == Usage(9, 4, 13)  # the stream's usage, from its last piece


def entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


async def test_the_log_probabilities_of_the_pieces_are_put_together_in_order(make_host: Any) -> None:
    pieces = [ChatDelta("Hel", logprobs={"content": [entry("Hel", -0.1)], "refusal": None}),
              ChatDelta("lo", logprobs={"content": [entry("lo", -0.2)]}),
              ChatDelta(refusal="no", logprobs={"content": None, "refusal": [entry("no", -0.3)]}),
              ChatDelta(finish_reason="stop")]
    p = FakeStreamingProvider("p", script=[pieces, ["plain", ChatDelta(finish_reason="stop")]])
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        stream = host.stream({"model": "m", "prompt": "hi", "logprobs": True})
        got = await collect(stream)
        plain = host.stream({"model": "m", "prompt": "hi"})
        await collect(plain)
    assert [d.logprobs for d in got] == [d.logprobs for d in pieces]  # each piece handed out with its own
    assert stream.result.logprobs == {"content": [entry("Hel", -0.1), entry("lo", -0.2)], "refusal": [entry("no", -0.3)]}
    assert plain.result.logprobs is None



async def test_a_streams_result_has_the_last_system_fingerprint_its_pieces_said(make_host: Any) -> None:
    pieces = [ChatDelta("a", system_fingerprint="fp_old"), ChatDelta("b", system_fingerprint="fp_new"),
              ChatDelta("c"), ChatDelta(finish_reason="stop")]
    p = FakeStreamingProvider("p", script=[pieces, ["plain", ChatDelta(finish_reason="stop")]])
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        got = await collect(stream)
        plain = host.stream({"model": "m", "prompt": "hi"})
        await collect(plain)
    assert [d.system_fingerprint for d in got] == ["fp_old", "fp_new", None, None]  # each piece with its own
    assert stream.result.system_fingerprint == "fp_new" and stream.result.to_dict()["system_fingerprint"] == "fp_new"
    assert plain.result.system_fingerprint is None and "system_fingerprint" not in plain.result.to_dict()

async def test_a_stream_whose_upstream_reports_no_usage_records_none(make_host: Any) -> None:
    p = FakeStreamingProvider("p", script=[["hi", ChatDelta(finish_reason="stop")]])
    ledger = UsageCalls()
    async with make_host(DirectQueue(), ScriptedProviders(p), ledger) as host:
        stream = host.stream({"model": "m", "prompt": "hi"})
        await collect(stream)
    assert ledger.calls[0].usage is None and ledger.calls[0].outcome == "ok"  # not invented


async def test_a_second_stream_of_a_request_id_already_streaming_is_refused(make_host: Any) -> None:
    hold = asyncio.Event()
    p = FakeStreamingProvider("p", script=[["a", hold.wait()]])
    async with make_host(DirectQueue(), ScriptedProviders(p)) as host:
        first = aiter(host.stream({"model": "m", "prompt": "hi", "request_id": "same"}))
        assert (await anext(first)).content == "a"
        with pytest.raises(Exception, match="being streamed already"):
            await collect(host.stream({"model": "m", "prompt": "hi", "request_id": "same"}))
        hold.set()
        async for _ in first:
            pass


async def test_break_out_of_the_loop_cancels_too(make_host: Any) -> None:
    forever = asyncio.Event()
    p = FakeStreamingProvider("p", script=[["one ", forever.wait()]])
    finished: list[Any] = []

    class Watch:
        @hookimpl
        def ksi_request_finished(self, result: Any) -> None:
            finished.append(result)

    async with make_host(DirectQueue(), ScriptedProviders(p), Watch()) as host:
        async for delta in host.stream({"model": "m", "prompt": "hi"}):
            assert delta.content == "one "
            break
        for _ in range(200):
            if finished:
                break
            await asyncio.sleep(0.01)
    assert p.closed == 1 and finished[0].status == "cancelled" and finished[0].text == "one "


async def test_a_consumer_that_leaves_without_cancelling_lets_the_request_finish(make_host: Any) -> None:
    release = asyncio.Event()
    p = FakeStreamingProvider("p", script=[["one ", release.wait(), "two"]])
    finished: list[Any] = []

    class Watch:
        @hookimpl
        def ksi_request_finished(self, result: Any) -> None:
            finished.append(result)

    async with make_host(DirectQueue(), ScriptedProviders(p), Watch()) as host:
        pieces = aiter(host.stream({"model": "m", "prompt": "hi", "request_id": "r1"}, cancel_on_exit=False))
        assert (await anext(pieces)).content == "one "
        await pieces.aclose()  # an HTTP client that went away
        release.set()
        for _ in range(200):
            if finished:
                break
            await asyncio.sleep(0.01)
    assert p.closed == 0 and finished[0].ok and finished[0].text == "one two"
