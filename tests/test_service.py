"""The orchestrator, with tiny in-test plugins (no real plugin)."""

import asyncio

import pytest

from ksi_host import (
    AuthFailed,
    BadRequest,
    CompletionRequest,
    FailureDecision,
    MissingPluginError,
    ProviderUnavailable,
    RateLimited,
    StartupError,
    Usage,
    hookimpl,
)
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    async def ksi_record_usage(self, request, call):
        self.calls.append(call)


class RetryAll:
    """Retries every failure up to 4 attempts, switching provider on AuthFailed."""

    def __init__(self, delay=0.5):
        self.delay = delay
        self.seen = []

    @hookimpl
    def ksi_handle_failure(self, request, error, attempt):
        self.seen.append(attempt)
        if isinstance(error, BadRequest) or attempt.number >= 4:
            return FailureDecision.give_up(error)
        return FailureDecision.retry(self.delay, switch_provider=isinstance(error, AuthFailed))


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def clock(self):
        return self.now

    async def sleep(self, s):
        self.slept.append(s)
        self.now += s


def req(**kw):
    return CompletionRequest.from_dict({"model": "m", "prompt": "hi", **kw})


async def test_complete_sequences_hooks(make_host):
    rec = Recorder()
    p = FakeProvider("a", usage=Usage(7, 3, 10, 0.01))
    async with make_host(DirectQueue(), ScriptedProviders(p), rec) as host:
        r = await host.complete(req(session_id="s1"))
    assert r.ok and r.text == "ok" and r.provider == "a" and r.session_id == "s1"
    assert r.usage == Usage(7, 3, 10, 0.01)
    assert [(c.attempt, c.provider, c.outcome) for c in rec.calls] == [(1, "a", "ok")]


async def test_submit_accepts_dicts_and_validates(make_host):
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a"))) as host:
        assert (await (await host.submit({"model": "m", "prompt": "x"})).result()).ok
        with pytest.raises(Exception) as e:
            await host.submit({"model": "m"})
        assert "messages" in str(e.value)


async def test_retries_failover_and_usage_of_failed_attempts(make_host):
    t = FakeTime()
    rec = Recorder()
    a = FakeProvider("a", script=[AuthFailed("bad key")])
    b = FakeProvider("b", script=[RateLimited("slow", usage=Usage(1, 0, 1)), ProviderUnavailable("500"), "done"])
    async with make_host(DirectQueue(), ScriptedProviders(a, b), rec, RetryAll(), clock=t.clock, sleep=t.sleep) as host:
        r = await host.complete(req())
    assert r.ok and r.text == "done" and r.provider == "b"
    assert [(x.number, x.provider, x.error_type, x.delay_s) for x in r.attempts] == [
        (1, "a", "AuthFailed", 0.5), (2, "b", "RateLimited", 0.5), (3, "b", "ProviderUnavailable", 0.5), (4, "b", None, None)]
    assert t.slept == [0.5, 0.5, 0.5]
    # every call is recorded as it ended; the failed attempt that reported usage is counted
    assert [(c.attempt, c.outcome, c.usage and c.usage.total_tokens) for c in rec.calls] == [
        (1, "AuthFailed", None), (2, "RateLimited", 1), (3, "ProviderUnavailable", None), (4, "ok", 15)]
    assert r.usage.total_tokens == 16


async def test_give_up_makes_an_error_result(make_host):
    a = FakeProvider("a", script=[BadRequest("nope")])
    async with make_host(DirectQueue(), ScriptedProviders(a), RetryAll()) as host:
        r = await host.complete(req())
    assert r.status == "error" and r.error == {"type": "BadRequest", "message": "nope"} and len(r.attempts) == 1


async def test_deadline_is_never_passed(make_host):
    t = FakeTime()
    a = FakeProvider("a", script=[ProviderUnavailable("down")])
    async with make_host(DirectQueue(), ScriptedProviders(a), RetryAll(delay=4), clock=t.clock, sleep=t.sleep) as host:
        r = await host.complete(req(timeout_s=10))
    assert r.status == "error" and r.error["type"] == "DeadlineExceeded"
    assert "deadline" in r.error["message"] and "ProviderUnavailable" in r.error["message"]
    assert sum(t.slept) <= 10


async def test_without_failure_plugin_errors_are_final_and_say_what_to_install(make_host):
    a = FakeProvider("a", script=[RateLimited("slow")])
    async with make_host(DirectQueue(), ScriptedProviders(a)) as host:
        r = await host.complete(req())
    assert r.status == "error" and "install ksi-retry: pip install -e plugins/retry" in r.error["message"] and len(a.calls) == 1


async def test_missing_queue_names_hook_and_distribution(make_host):
    async with make_host(ScriptedProviders(FakeProvider("a"))) as host:
        with pytest.raises(MissingPluginError, match="no plugin implements ksi_enqueue: install ksi-queue: pip install -e plugins/queue"):
            await host.submit(req())


async def test_missing_provider_plugin_is_a_clear_error_result(make_host):
    async with make_host(DirectQueue()) as host:
        r = await host.complete(req())
    assert r.error["type"] == "MissingPluginError"
    assert r.error["message"] == ("no plugin implements ksi_select_provider: install ksi-provider-litellm: "
                                  "pip install -e plugins/provider")


async def test_unserved_model_names_model_and_configured_models(make_host):
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a", model="gpt-*"), FakeProvider("b", model="mock/*"))) as host:
        r = await host.complete(req(model="claude"))
    assert r.error["type"] == "NoProviderError"
    assert "'claude'" in r.error["message"] and "gpt-*" in r.error["message"] and "mock/*" in r.error["message"]


async def test_programming_error_in_provider_propagates_with_its_name(make_host):
    async def bug(request):
        raise ZeroDivisionError("oops")

    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("buggy", script=[bug]))) as host:
        with pytest.raises(ZeroDivisionError) as e:
            await host.complete(req())
    assert any("provider 'buggy'" in n for n in e.value.__notes__)


async def test_programming_error_in_a_hook_propagates(make_host):
    class Ledger:
        @hookimpl
        def ksi_record_usage(self, call):
            raise KeyError("ledger")

    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a")), Ledger()) as host:
        with pytest.raises(KeyError) as e:
            await host.complete(req())
    assert "raised by plugin 'Ledger' in hook ksi_record_usage" in e.value.__notes__


async def test_startup_and_shutdown_order_and_config(make_host):
    import attrs

    events = []

    @attrs.define
    class Cfg:
        greeting: str = "hello"

    class A:
        @hookimpl
        def ksi_config_spec(self):
            return ("a", Cfg)

        @hookimpl
        async def ksi_startup(self, host):
            events.append(("start a", host.config["a"].greeting, host.db is not None))

        @hookimpl
        def ksi_shutdown(self):
            events.append("stop a")

    class B:
        @hookimpl
        def ksi_startup(self):
            events.append("start b")

        @hookimpl
        def ksi_shutdown(self):
            events.append("stop b")

    async with make_host(A(), B(), config={"a": {"greeting": "hi"}}):
        pass
    assert events == [("start a", "hi", True), "start b", "stop b", "stop a"]


async def test_failed_startup_closes_what_started(make_host):
    events = []

    class Good:
        @hookimpl
        def ksi_startup(self):
            events.append("good up")

        @hookimpl
        def ksi_shutdown(self):
            events.append("good down")

    class Bad:
        @hookimpl
        def ksi_startup(self):
            raise StartupError("cannot open")

        @hookimpl
        def ksi_shutdown(self):
            events.append("bad down")

    with pytest.raises(StartupError, match="cannot open"):
        async with make_host(Good(), Bad()):
            pass
    assert events == ["good up", "good down"]


async def test_status_merges_sections_and_providers_flatten(make_host):
    class S1:
        @hookimpl
        def ksi_status(self):
            return {"one": 1}

    class S2:
        @hookimpl
        async def ksi_status(self):
            return {"two": [2]}

    class S3:
        @hookimpl
        def ksi_status(self):
            return {"two": [3]}

    async with make_host(S1(), S2(), S3(), ScriptedProviders(FakeProvider("a"), FakeProvider("b", model="x*"))) as host:
        assert await host.status() == {"one": 1, "two": [3, 2]}
        assert [p.name for p in await host.providers("xyz")] == ["a", "b"]
        assert [p.name for p in await host.providers("m")] == ["a"]


async def test_concurrent_completions(make_host):
    async def slow(request):
        await asyncio.sleep(0.01)
        return "slow"

    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a", script=[slow]))) as host:
        results = await asyncio.gather(*[host.complete(req()) for _ in range(50)])
    assert all(r.ok for r in results)


def test_host_module_stays_thin():
    import ksi_host.service

    with open(ksi_host.service.__file__) as f:
        assert len(f.readlines()) < 300


class _Recorder:
    """Records each ledger row the host hands to ``ksi_record_usage``."""

    def __init__(self) -> None:
        self.calls: list = []

    @hookimpl
    def ksi_record_usage(self, call):
        self.calls.append(call)


async def test_a_providers_prepare_is_not_the_attempts_latency(make_host):
    """A provider's ``prepare()`` (litellm's import: seconds on the first call) runs before the attempt's clock:
    the latency in the result and the ledger is the call's."""
    from ksi_host.testing import FakeClock

    clock = FakeClock()

    async def answer(request):
        await provider.prepare()  # as litellm's attempt does: its import, when nobody did it before
        clock.advance(0.25)  # the upstream's time
        return "hi"

    class Slow(FakeProvider):
        prepared = 0

        async def prepare(self):
            if not self.prepared:
                self.prepared += 1
                clock.advance(8.0)  # a lazy import, once
                await asyncio.sleep(0)

    provider, ledger = Slow("slow", script=[answer]), _Recorder()
    async with make_host(DirectQueue(), ScriptedProviders(provider), ledger, clock=clock) as host:
        result = await host.complete({"model": "m", "prompt": "hi"})
    assert result.ok and provider.prepared == 1
    assert result.attempts[0].latency_ms == pytest.approx(250) and ledger.calls[0].latency_ms == pytest.approx(250)
