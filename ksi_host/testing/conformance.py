"""The provider conformance suite: what every provider plugin must do, as tests a plugin's own test file inherits.

A provider plugin's tests subclass :class:`ProviderConformance` and say two things: the plugin object
(:meth:`~ProviderConformance.plugin`) and how the suite's deployments are written in the plugin's
config table (:meth:`~ProviderConformance.config`). pytest collects the subclass (its name starts
with ``Test``) with every test of the suite::

    from ksi_host.testing.conformance import ProviderConformance

    class TestMyProviderConformance(ProviderConformance):
        def plugin(self):
            return Plugin()

        def config(self, deployments):
            return {"myprov": {"deployments": [
                {"name": d.name, "model": d.model, "api_base": d.api_base, "api_key_env": d.api_key_env,
                 "upstream_model": d.upstream_model, "timeout_s": d.timeout_s} for d in deployments]}}

Each test builds a Host (``make_host``) with the plugin, :class:`~ksi_host.testing.DirectQueue` and
the test's own observers, on deployments of :data:`MODEL` at the local OpenAI-compatible server
(the ``openai_server`` fixture, :class:`~ksi_host.testing.server.OpenAIServer`), with the key
:data:`KEY` in the variable :data:`KEY_ENV`. The plugin is called through the host (and, for the
fault tests, the provider the plugin's ``ksi_select_provider`` returns), over real HTTP; each test
reads what reached the server in its arrival log. What the suite checks:

- a plain completion: the text, the usage (no cost for a model without a price), the session, the key
  sent as ``Authorization: Bearer``, exactly one upstream call;
- every chat parameter (:data:`ksi_host.testing.chat.EVERY_PARAMETER`) and the ``provider_options``
  (:attr:`~ProviderConformance.PROVIDER_OPTIONS`) arriving as sent, whole and streamed, and
  ``provider_options`` refused (BadRequest, nothing sent) where they would set what the provider sets;
- a tool call and its round trip, whole and streamed; JSON mode; cached and reasoning tokens, the
  upstream's model name and a refusal; the answer's log probabilities when asked (none when not); the
  upstream's ``system_fingerprint``, whole and streamed (none when it sent none);
- streaming: pieces before the upstream finishes, failover before the first piece, a cut stream
  an error (not retried), the consumer leaving closing the connection, a gap longer than the timeout a
  ProviderTimeout, the last chunk's usage the call's;
- each failing fault of the server (:data:`ksi_host.testing.faults.PROVIDER_FAULTS`) mapped to its
  OperationalError class and HTTP status, whole and streamed, in exactly one upstream call, the key in
  no message, the provider usable after it.

A provider that does not stream piece by piece (writes no ``attempt_stream``: the kit then answers a
streamed request in one piece, from ``attempt``) sets :attr:`~ProviderConformance.STREAMS` to False: the
tests of piece-by-piece streaming are then left out, and one test checks the one-piece answer instead.

A plugin whose deployments need a fixture (a client, a temporary folder) overrides the
``provider_host`` fixture instead of :meth:`~ProviderConformance.plugin`. The async tests carry the
``asyncio`` mark, so the suite runs under pytest-asyncio's default strict mode as in ``auto``.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs
import pytest

from ..errors import AuthFailed, ProviderTimeout, ProviderUnavailable, RateLimited
from ..models import ChatDelta, CompletionRequest
from ..service import Host
from .chat import EVERY_PARAMETER, WEATHER, until
from .fakes import DirectQueue, FailOver, UsageCalls
from .faults import PROVIDER_FAULTS
from .server import SYSTEM_FINGERPRINT, logprob_entries

MODEL = "gpt-test"
"""The model every deployment of the suite serves (the server answers any name)."""

KEY_ENV = "KSI_CONFORMANCE_KEY"
"""The environment variable the suite's deployments read their key from (set for each test)."""

KEY = "sk-ksi-conformance-SECRET-0123456789abcdef"
"""The key: it must reach the server as ``Authorization: Bearer KEY`` and no error message."""

MANAGED_OPTIONS = ("model", "messages", "stream", "stream_options")
"""What ``provider_options`` may not set: the provider sets it (BadRequest, nothing sent)."""


@attrs.frozen
class DeploymentSpec:
    """One deployment the suite asks for, in no plugin's terms: :meth:`ProviderConformance.config`
    writes it as an entry of the plugin's table."""

    api_base: str
    """The test server's ``.../v1`` URL."""
    name: str = "main"
    model: str = MODEL
    upstream_model: str | None = None
    """The model name to send upstream instead of the requested one (None: the requested one)."""
    api_key_env: str = KEY_ENV
    timeout_s: float = 5.0


def request(text: str = "hello there", **kw: Any) -> CompletionRequest:
    """A one-message request for :data:`MODEL`."""
    return CompletionRequest(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


async def _streamed(host: Host, req: dict[str, Any]) -> tuple[list[ChatDelta], Any]:
    stream = host.stream(req)
    pieces = [d async for d in stream]
    return pieces, stream.result


class ProviderConformance:
    """The tests every provider plugin passes; subclass it as ``Test...`` and define :meth:`plugin` and
    :meth:`config` (see the module's docstring)."""

    PROVIDER_OPTIONS: ClassVar[dict[str, Any]] = {"top_k": 40, "repetition_penalty": 1.1, "guided": {"choice": ["a", "b"]}}
    """``provider_options`` the parameter test sends: keys no chat parameter has, which must arrive in the body."""

    EXACT_STATUS: ClassVar[bool] = True
    """Must a fault without an HTTP status (a malformed answer, a dropped connection) carry none? False for a
    plugin whose client library gives those a status of its own (litellm: 500); the others are checked anyway."""

    CONNECTION_FAILED: ClassVar[str] = "connection failed"
    """What the message of a dropped connection (a cut stream) says after ``"<deployment>: "`` (a regular
    expression): the kit's :func:`~ksi_host.providers.connection_error` by default."""

    STREAMS: ClassVar[bool] = True
    """Does the provider stream piece by piece (its class writes ``attempt_stream``)? False: a streamed request
    is answered in one piece; the tests in :data:`PIECE_BY_PIECE` are not collected, and
    ``test_a_stream_is_answered_in_one_piece`` is (see :meth:`__init_subclass__`)."""

    PIECE_BY_PIECE: ClassVar[tuple[str, ...]] = (
        "test_pieces_arrive_before_the_upstream_finishes", "test_a_cut_stream_is_an_error_not_a_clean_end_and_is_not_retried",
        "test_the_consumer_leaving_closes_the_connection", "test_a_streamed_tool_call_is_put_together")
    """The tests only a provider that streams piece by piece can pass."""

    def __init_subclass__(cls, **kw: Any) -> None:
        """Leave out the tests that do not apply (a name set to None is not collected by pytest), and put back
        those that do (a subclass of a subclass may say otherwise than its parent)."""
        super().__init_subclass__(**kw)
        one_piece = ("test_a_stream_is_answered_in_one_piece",)
        for name in (*cls.PIECE_BY_PIECE, *one_piece):
            applies = cls.STREAMS != (name in one_piece)
            setattr(cls, name, ProviderConformance.__dict__[name] if applies else None)

    # -- what a subclass provides ----------------------------------------------------------

    def plugin(self) -> Any:
        """A new instance of the plugin under test."""
        raise NotImplementedError(f"{type(self).__name__} must define plugin() (or the provider_host fixture)")

    def config(self, deployments: Sequence[DeploymentSpec]) -> dict[str, Any]:
        """The host config (``{table: {...}}``) whose deployments are ``deployments``, in that order."""
        raise NotImplementedError(f"{type(self).__name__} must define config(deployments) (or the provider_host fixture)")

    @pytest.fixture
    def provider_host(self, make_host: Callable[..., Host], openai_server: Any,
                      monkeypatch: pytest.MonkeyPatch) -> Callable[..., Host]:
        """``provider_host(*observers, names=("main",), **spec)``: a Host with the plugin, DirectQueue and
        ``observers``, one deployment per name (more :class:`DeploymentSpec` keys in ``spec``)."""
        monkeypatch.setenv(KEY_ENV, KEY)

        def factory(*observers: Any, names: Sequence[str] = ("main",), **spec: Any) -> Host:
            deployments = [DeploymentSpec(**{"api_base": openai_server.url, "name": name, **spec}) for name in names]
            return make_host(self.plugin(), DirectQueue(), *observers, config=self.config(deployments))

        return factory

    @staticmethod
    async def selected(host: Host) -> Any:
        """The provider the plugin returns for a request of :data:`MODEL` (for calls without the host)."""
        provider = await host.hooks.first("ksi_select_provider", host=host, request=request(), exclude=frozenset())
        assert provider is not None, "the plugin returned no provider for the suite's model"
        return provider

    # -- one call ----------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_a_plain_completion(self, provider_host: Any, openai_server: Any) -> None:
        async with provider_host() as host:
            r = await host.complete({"model": MODEL, "prompt": "hello there", "session_id": "conv-7"})
        assert r.ok and r.text == "echo: hello there" and r.finish_reason == "stop" and r.model == MODEL, r
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 3, 8)
        assert r.usage.cost_usd is None  # no price is known for the suite's model: no cost, not a cost of 0
        assert r.session_id == "conv-7" and openai_server.hits == 1
        arrival = openai_server.arrivals[0]
        assert arrival.model == MODEL and arrival.authorization == f"Bearer {KEY}"  # read from KEY_ENV

    @pytest.mark.asyncio
    @pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("http-date", 30.0), (None, None)],
                             ids=["seconds", "http-date", "absent"])
    async def test_a_rate_limit_carries_its_retry_after(self, provider_host: Any, openai_server: Any,
                                                        header: str | None, seconds: float | None) -> None:
        openai_server.retry_after = email.utils.formatdate(time.time() + 30, usegmt=True) if header == "http-date" else header
        openai_server.script("429")
        async with provider_host() as host:
            with pytest.raises(RateLimited) as info:
                await (await self.selected(host)).complete(request(), timeout_s=5)
        assert info.value.retry_after == (None if seconds is None else pytest.approx(seconds, abs=2))
        if header == "7":
            assert "retry after 7s" in info.value.message

    @pytest.mark.asyncio
    @pytest.mark.parametrize("given", [0.3, None], ids=["the-hosts", "the-deployments"])
    async def test_a_hang_is_a_timeout_at_the_timeout(self, provider_host: Any, openai_server: Any,
                                                      given: float | None) -> None:
        openai_server.script("hang")
        async with provider_host(timeout_s=0.3 if given is None else 5) as host:
            p = await self.selected(host)
            t0 = time.monotonic()
            with pytest.raises(ProviderTimeout) as info:
                await p.complete(request(), timeout_s=given)  # None: the deployment's own timeout
            elapsed = time.monotonic() - t0
        assert 0.28 <= elapsed < 1.0, elapsed
        assert info.value.provider == "main" and "0.3s" in info.value.message and openai_server.hits == 1

    @pytest.mark.asyncio
    async def test_a_refused_connection_is_provider_unavailable(self, provider_host: Any) -> None:
        async with provider_host(api_base="http://127.0.0.1:9/v1") as host:  # the discard port: nothing listens
            with pytest.raises(ProviderUnavailable) as info:
                await (await self.selected(host)).complete(request(), timeout_s=3)
        assert info.value.provider == "main" and re.match(f"main: {self.CONNECTION_FAILED}", info.value.message)

    @pytest.mark.asyncio
    async def test_an_unset_key_variable_is_auth_failed_naming_it(self, provider_host: Any, openai_server: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        async with provider_host() as host:
            monkeypatch.delenv(KEY_ENV)  # (after start-up, which refuses a model no deployment has the key of)
            with pytest.raises(AuthFailed) as info:
                await (await self.selected(host)).complete(request(), timeout_s=5)
        assert KEY_ENV in info.value.message and info.value.provider == "main"
        assert openai_server.hits == 0  # nothing sent without a key

    @pytest.mark.asyncio
    @pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
    async def test_every_parameter_and_the_provider_options_arrive_as_sent(self, provider_host: Any, openai_server: Any,
                                                                           streamed: bool) -> None:
        options = self.PROVIDER_OPTIONS
        req = {"model": MODEL, "prompt": "weather in Paris", **EVERY_PARAMETER, "provider_options": options}
        async with provider_host() as host:
            result = (await _streamed(host, req))[1] if streamed else await host.complete(req)
        assert result is not None and result.ok, result
        body = openai_server.arrivals[0].body
        for name, value in {**EVERY_PARAMETER, **options}.items():
            assert body[name] == value, name
        assert body["model"] == MODEL and body["messages"] == [{"role": "user", "content": "weather in Paris"}]
        streams = streamed and self.STREAMS  # a provider that does not stream sends a streamed request whole
        assert set(body) == {"model", "messages", *EVERY_PARAMETER, *options} | ({"stream", "stream_options"} if streams else set())
        if streams:
            assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    @pytest.mark.asyncio
    @pytest.mark.parametrize("key", MANAGED_OPTIONS)
    async def test_provider_options_may_not_set_what_the_provider_sets(self, provider_host: Any, openai_server: Any,
                                                                       key: str) -> None:
        async with provider_host() as host:
            r = await host.complete({"model": MODEL, "prompt": "hi", "provider_options": {key: True}})
        assert r.error is not None and r.error["type"] == "BadRequest", r.error
        assert f"provider_options.{key}" in r.error["message"] and "nothing was sent" in r.error["message"]
        assert openai_server.hits == 0

    @pytest.mark.asyncio
    async def test_a_tool_call_round_trip(self, provider_host: Any, openai_server: Any) -> None:
        user = {"role": "user", "content": "weather in Paris"}
        async with provider_host() as host:
            first = await host.complete({"model": MODEL, "messages": [user], "tools": [WEATHER]})
            assert first.ok and first.finish_reason == "tool_calls" and first.text is None
            [call] = first.message["tool_calls"]
            assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
                "city": "weather in Paris"}
            tool = {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}
            second = await host.complete({"model": MODEL, "messages": [user, first.message, tool], "tools": [WEATHER]})
        assert second.ok and second.text == "the tool said: sunny, 21 C" and second.finish_reason == "stop"
        sent = openai_server.arrivals[1].body["messages"]
        assert sent[0] == user and sent[2] == tool
        # the assistant's turn as it came: its tool calls, no content (null or left out: the same in the chat format)
        assert {k: v for k, v in sent[1].items() if v is not None} == {"role": "assistant", "tool_calls": [call]}

    @pytest.mark.asyncio
    async def test_json_mode(self, provider_host: Any) -> None:
        schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
        async with provider_host() as host:
            obj = await host.complete({"model": MODEL, "prompt": "Paris", "response_format": {"type": "json_object"}})
            typed = await host.complete({"model": MODEL, "prompt": "Paris", "response_format": {
                "type": "json_schema", "json_schema": {"name": "w", "schema": schema}}})
        assert json.loads(obj.text) == {"echo": "echo: Paris"}
        assert json.loads(typed.text) == {"city": "echo: Paris", "days": 1}

    @pytest.mark.asyncio
    async def test_cached_and_reasoning_tokens_the_model_and_a_refusal(self, provider_host: Any, openai_server: Any) -> None:
        openai_server.cached_tokens, openai_server.reasoning_tokens = 3, 4
        usage = UsageCalls()
        async with provider_host(usage, upstream_model="served-name") as host:
            r = await host.complete({"model": MODEL, "prompt": "hi"})
            openai_server.script("refusal")
            refused = await host.complete({"model": MODEL, "prompt": "hi"})
        assert (r.usage.cached_tokens, r.usage.reasoning_tokens) == (3, 4) and r.model == "served-name"
        assert openai_server.arrivals[0].model == "served-name" and usage.calls[0].usage == r.usage
        assert refused.ok and refused.message["refusal"] == "I can't help with that (test server)."

    @pytest.mark.asyncio
    async def test_log_probabilities_come_back_when_asked(self, provider_host: Any) -> None:
        async with provider_host() as host:
            r = await host.complete({"model": MODEL, "prompt": "one two", "logprobs": True, "top_logprobs": 2})
            plain = await host.complete({"model": MODEL, "prompt": "one two"})
        assert r.ok and r.logprobs is not None, r
        assert [e["token"] for e in r.logprobs["content"]] == ["echo: ", "one ", "two"]
        assert r.logprobs["content"] == logprob_entries("echo: one two", 2) and r.logprobs.get("refusal") is None
        assert [len(e["top_logprobs"]) for e in r.logprobs["content"]] == [2, 2, 2]
        assert plain.ok and plain.logprobs is None and "logprobs" not in plain.to_dict()

    @pytest.mark.asyncio
    async def test_a_streams_log_probabilities_come_with_its_pieces_and_in_its_result(self, provider_host: Any) -> None:
        async with provider_host() as host:
            pieces, r = await _streamed(host, {"model": MODEL, "prompt": "one two", "logprobs": True, "top_logprobs": 1})
            _, plain = await _streamed(host, {"model": MODEL, "prompt": "one two"})
        expected = logprob_entries("echo: one two", 1)
        assert [e for d in pieces if d.logprobs for e in d.logprobs["content"] or ()] == expected
        assert r is not None and r.ok and r.logprobs is not None and r.logprobs["content"] == expected, r
        assert not r.logprobs.get("refusal")
        assert plain is not None and plain.ok and plain.logprobs is None

    @pytest.mark.asyncio
    async def test_the_upstreams_system_fingerprint_comes_back_whole_and_streamed(self, provider_host: Any,
                                                                                 openai_server: Any) -> None:
        async with provider_host() as host:
            whole = await host.complete({"model": MODEL, "prompt": "one two", "seed": 7})
            pieces, streamed = await _streamed(host, {"model": MODEL, "prompt": "one two", "seed": 7})
            openai_server.system_fingerprint = None  # an upstream that says none
            plain = await host.complete({"model": MODEL, "prompt": "one two"})
            _, plain_streamed = await _streamed(host, {"model": MODEL, "prompt": "one two"})
        assert whole.ok and whole.system_fingerprint == SYSTEM_FINGERPRINT, whole
        assert whole.to_dict()["system_fingerprint"] == SYSTEM_FINGERPRINT
        assert pieces and {d.system_fingerprint for d in pieces} == {SYSTEM_FINGERPRINT}
        assert streamed is not None and streamed.ok and streamed.system_fingerprint == SYSTEM_FINGERPRINT, streamed
        assert plain.ok and plain.system_fingerprint is None and "system_fingerprint" not in plain.to_dict()
        assert plain_streamed is not None and plain_streamed.ok and plain_streamed.system_fingerprint is None

    # -- streaming --------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_pieces_arrive_before_the_upstream_finishes(self, provider_host: Any, openai_server: Any) -> None:
        openai_server.script("hold")  # the server holds its last chunk (the finish reason) until released
        async with provider_host() as host:
            stream = host.stream({"model": MODEL, "prompt": "one two three"})
            got: list[ChatDelta] = []
            async for delta in stream:
                if not got:
                    assert openai_server.holding == 1  # the upstream has not finished: this piece came ahead of it
                    openai_server.release()
                got.append(delta)
        assert [d.content for d in got if d.content] == ["echo: ", "one ", "two ", "three"]
        assert got[-2].finish_reason == "stop" and got[-1].usage is not None
        r = stream.result
        assert r is not None and r.ok and r.text == "echo: one two three" and r.finish_reason == "stop"
        assert r.usage.total_tokens == 10 and r.attempts[0].ttft_ms is not None

    @pytest.mark.asyncio
    async def test_failover_before_the_first_piece(self, provider_host: Any, openai_server: Any) -> None:
        openai_server.script("503")
        async with provider_host(FailOver(), names=("first", "second")) as host:
            pieces, result = await _streamed(host, {"model": MODEL, "prompt": "hi"})
        assert "".join(d.content or "" for d in pieces) == "echo: hi" and result.provider == "second"
        assert [(a.provider, a.error_type) for a in result.attempts] == [("first", "ProviderUnavailable"), ("second", None)]
        assert openai_server.hits == 2  # one upstream call per attempt: no retry inside the provider

    @pytest.mark.asyncio
    async def test_a_cut_stream_is_an_error_not_a_clean_end_and_is_not_retried(self, provider_host: Any,
                                                                                openai_server: Any) -> None:
        openai_server.cut_after = 3
        openai_server.script("cut")
        usage = UsageCalls()
        async with provider_host(FailOver(), usage, names=("first", "second")) as host:
            stream = host.stream({"model": MODEL, "prompt": "one two three"})
            got = []
            with pytest.raises(ProviderUnavailable, match=f"^first: {self.CONNECTION_FAILED}"):
                async for delta in stream:
                    got.append(delta.content)
        assert [c for c in got if c] == ["echo: ", "one "]
        assert stream.result is not None and stream.result.status == "error" and stream.result.text == "echo: one "
        assert openai_server.hits == 1 and [c.outcome for c in usage.calls] == ["ProviderUnavailable"]

    @pytest.mark.asyncio
    async def test_the_consumer_leaving_closes_the_connection(self, provider_host: Any, openai_server: Any) -> None:
        openai_server.script("hold")
        async with provider_host() as host:
            stream = host.stream({"model": MODEL, "prompt": "one two three"})
            async for _ in stream:
                break
            await until(lambda: openai_server.closed_early == 1, timeout=15)  # the server saw the client go, while it held
            assert openai_server.holding == 0
            assert (await host.complete({"model": MODEL, "prompt": "again"})).ok  # the provider still works

    @pytest.mark.asyncio
    async def test_a_gap_longer_than_the_timeout_is_a_timeout(self, provider_host: Any, openai_server: Any) -> None:
        openai_server.script("hold")
        async with provider_host(timeout_s=0.3) as host:
            stream = host.stream({"model": MODEL, "prompt": "one two"})
            with pytest.raises(ProviderTimeout, match="main: no answer within 0.3s"):
                [d async for d in stream]
            if self.STREAMS:
                await until(lambda: openai_server.closed_early == 1)

    @pytest.mark.asyncio
    async def test_usage_of_the_last_chunk_is_the_calls_usage(self, provider_host: Any, openai_server: Any) -> None:
        openai_server.cached_tokens = 2
        usage = UsageCalls()
        async with provider_host(usage) as host:
            _, result = await _streamed(host, {"model": MODEL, "prompt": "one two"})
        sent = openai_server.arrivals[0].usage
        [call] = usage.calls
        assert call.outcome == "ok" and call.usage.cached_tokens == 2
        assert (call.usage.prompt_tokens, call.usage.completion_tokens) == (sent["prompt_tokens"], sent["completion_tokens"])
        assert result is not None and result.usage == call.usage

    @pytest.mark.asyncio
    async def test_a_streamed_tool_call_is_put_together(self, provider_host: Any) -> None:
        async with provider_host() as host:
            pieces, r = await _streamed(host, {"model": MODEL, "prompt": "weather in Paris", "tools": [WEATHER]})
        assert sum(1 for d in pieces if d.tool_calls) > 2  # the name, then the arguments in pieces
        assert r is not None and r.finish_reason == "tool_calls"
        [call] = r.message["tool_calls"]
        assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
            "city": "weather in Paris"}

    @pytest.mark.asyncio
    async def test_a_stream_is_answered_in_one_piece(self, provider_host: Any, openai_server: Any) -> None:
        """(Only with ``STREAMS = False``.) A streamed request gets the whole answer as one piece, from one
        upstream call that did not ask for a stream; a tool call comes whole too."""
        async with provider_host() as host:
            pieces, r = await _streamed(host, {"model": MODEL, "prompt": "one two three"})
            _, tool = await _streamed(host, {"model": MODEL, "prompt": "weather in Paris", "tools": [WEATHER]})
        assert [d.content for d in pieces if d.content] == ["echo: one two three"]
        assert r is not None and r.ok and r.text == "echo: one two three" and r.finish_reason == "stop"
        sent = openai_server.arrivals[0]
        assert r.usage.total_tokens == sent.usage["total_tokens"] and openai_server.hits == 2 and "stream" not in sent.body
        assert tool is not None and tool.finish_reason == "tool_calls"
        [call] = tool.message["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"city": "weather in Paris"}

    # -- faults -----------------------------------------------------------------------------

    @pytest.mark.asyncio
    @pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
    @pytest.mark.parametrize(("fault", "error", "status"), PROVIDER_FAULTS)
    async def test_each_fault_maps_in_exactly_one_upstream_attempt(self, provider_host: Any, openai_server: Any,
                                                                   fault: str, error: type, status: int | None,
                                                                   streamed: bool) -> None:
        async with provider_host() as host:
            p = await self.selected(host)
            openai_server.script(fault)
            with pytest.raises(error) as info:
                if streamed:
                    [d async for d in p.stream(request(), timeout_s=5)]
                else:
                    await p.complete(request(), timeout_s=5)
            e = info.value
            assert type(e) is error and e.provider == "main"
            if status is not None or self.EXACT_STATUS:
                assert e.status_code == status
            assert e.message.startswith("main: ") and KEY not in e.message
            assert openai_server.hits == 1, f"{fault}: {openai_server.hits} upstream attempts, want exactly 1"
            # the provider (its connections) still works after any fault
            assert (await p.complete(request(), timeout_s=5)).text == "echo: hello there"
            assert [d async for d in p.stream(request(), timeout_s=5)][-1].usage is not None


__all__ = ["KEY", "KEY_ENV", "MANAGED_OPTIONS", "MODEL", "DeploymentSpec", "ProviderConformance", "request"]
