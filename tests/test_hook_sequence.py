"""The hooks of one request, in the order hookspecs draws: prepare, select, admit, attempt_started,
the call, record_usage, handle_failure, attempt_finished, request_finished. Tiny in-test plugins."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import attrs
import pluggy
import pytest

from ksi_host import (
    BudgetExceeded,
    CompletionRequest,
    DeadlineExceeded,
    FailureDecision,
    PluginLoadError,
    ProviderUnavailable,
    RateLimited,
    Usage,
    ValidationError,
    hookimpl,
    hookspecs,
)
from ksi_host.hooks import HookCaller
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


class Journal:
    """Writes down every hook it sees, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    @hookimpl
    def ksi_prepare_request(self, request: CompletionRequest) -> None:
        self.log.append(("prepare", request.request_id))

    @hookimpl
    def ksi_admit(self, request: CompletionRequest, provider: Any, attempt: int) -> None:
        self.log.append(("admit", attempt, provider.name))

    @hookimpl
    def ksi_attempt_started(self, request: CompletionRequest, call: Any) -> None:
        self.log.append(("started", call.attempt, call.provider, call.outcome, call.call_id))

    @hookimpl
    def ksi_record_usage(self, request: CompletionRequest, call: Any) -> None:
        self.log.append(("record", call.attempt, call.outcome, call.usage and call.usage.total_tokens, call.call_id))

    @hookimpl
    def ksi_attempt_finished(self, request: CompletionRequest, attempt: Any, error: Any, call: Any) -> None:
        self.log.append(("attempt_finished", attempt.number, attempt.provider, error and error.type,
                         call and call.outcome, attempt.delay_s))

    @hookimpl
    def ksi_request_finished(self, request: CompletionRequest, result: Any) -> None:
        self.log.append(("request_finished", result.status, len(result.attempts)))


class RetryOnce:
    @hookimpl
    def ksi_handle_failure(self, error: Any, attempt: Any) -> FailureDecision:
        return FailureDecision.retry(0.0) if attempt.number == 1 else FailureDecision.give_up(error)


async def test_one_request_runs_its_hooks_in_the_documented_order(make_host: Any) -> None:
    j = Journal()
    p = FakeProvider("p", script=[RateLimited("slow"), "done"])
    async with make_host(DirectQueue(), ScriptedProviders(p), RetryOnce(), j) as host:
        r = await host.complete({"model": "m", "prompt": "hi", "request_id": "r1"})
    assert r.ok
    names = [e[0] for e in j.log]
    assert names == ["prepare", "admit", "started", "record", "attempt_finished",
                     "admit", "started", "record", "attempt_finished", "request_finished"]
    first_started, first_record, second_started, second_record = j.log[2], j.log[3], j.log[6], j.log[7]
    assert first_started[3] == "sent" and first_record[2] == "RateLimited" and first_record[3] is None
    assert first_started[4] == first_record[4] != second_started[4] == second_record[4]  # one call_id per call
    assert second_record[1:4] == (2, "ok", 15)
    assert j.log[4] == ("attempt_finished", 1, "p", "RateLimited", "RateLimited", 0.0)
    assert j.log[8] == ("attempt_finished", 2, "p", None, "ok", None)
    assert j.log[9] == ("request_finished", "ok", 2)


async def test_a_request_nothing_serves_is_observed_with_no_call(make_host: Any) -> None:
    j = Journal()
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p", model="other")), j) as host:
        r = await host.complete({"model": "m", "prompt": "hi"})
    assert r.error["type"] == "NoProviderError"
    assert [e[0] for e in j.log] == ["prepare", "attempt_finished", "request_finished"]
    assert j.log[1] == ("attempt_finished", 1, None, "NoProviderError", None, None)


class Prefix:
    def __init__(self, text: str) -> None:
        self.text = text

    @hookimpl
    def ksi_prepare_request(self, request: CompletionRequest) -> CompletionRequest:
        return attrs.evolve(request, messages=({"role": "system", "content": self.text}, *request.messages))


async def test_prepare_request_chains_and_providers_see_the_prepared_request(make_host: Any) -> None:
    seen: list[Any] = []

    class Echo(FakeProvider):
        async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> Any:
            seen.append([m["content"] for m in request.messages])
            return await super().complete(request, timeout_s=timeout_s)

    async with make_host(DirectQueue(), ScriptedProviders(Echo("p")), Prefix("one"), Prefix("two")) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
    # newest registered first: "two" prepends, then "one" prepends before it
    assert seen == [["one", "two", "hi"]]


async def test_prepare_request_must_keep_the_request_id(make_host: Any) -> None:
    class Renamer:
        @hookimpl
        def ksi_prepare_request(self, request: CompletionRequest) -> CompletionRequest:
            return attrs.evolve(request, request_id="other")

    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p")), Renamer()) as host:
        with pytest.raises(TypeError, match="plugin 'Renamer'.*same request_id"):
            await host.complete({"model": "m", "prompt": "hi"})


async def test_prepare_request_may_refuse_with_an_operational_error(make_host: Any) -> None:
    class Refuser:
        @hookimpl
        def ksi_prepare_request(self, request: CompletionRequest) -> None:
            raise ValidationError("session_id", "no such session")

    p = FakeProvider("p")
    async with make_host(DirectQueue(), ScriptedProviders(p), Refuser()) as host:
        r = await host.complete({"model": "m", "prompt": "hi"})
    assert r.error["type"] == "ValidationError" and not p.calls


class Gate:
    """Admits when opened; counts the admissions waiting."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    @hookimpl
    async def ksi_admit(self, request: CompletionRequest, provider: Any, attempt: int) -> None:
        self.waiting += 1
        await self.open.wait()
        self.waiting -= 1


async def test_admission_waits_and_the_call_goes_out_only_after(make_host: Any) -> None:
    gate, j = Gate(), Journal()
    p = FakeProvider("p")
    async with make_host(DirectQueue(), ScriptedProviders(p), gate, j) as host:
        task = asyncio.ensure_future(host.complete({"model": "m", "prompt": "hi"}))
        for _ in range(20):
            await asyncio.sleep(0)
        assert gate.waiting == 1 and not p.calls and "started" not in [e[0] for e in j.log]
        gate.open.set()
        r = await task
    assert r.ok and len(p.calls) == 1 and len(r.attempts) == 1  # the wait is not an attempt


async def test_admission_never_waits_past_the_deadline(make_host: Any) -> None:
    gate, j = Gate(), Journal()
    p = FakeProvider("p")
    async with make_host(DirectQueue(), ScriptedProviders(p), gate, j) as host:
        r = await host.complete({"model": "m", "prompt": "hi", "timeout_s": 0.2})
    assert r.error["type"] == DeadlineExceeded.__name__ and "admission" in r.error["message"]
    assert not p.calls
    # admission was asked, nothing was sent, the observers heard of the attempt once
    assert [e[0] for e in j.log] == ["prepare", "admit", "attempt_finished", "request_finished"]


async def test_a_refused_admission_ends_the_request_and_nothing_is_sent(make_host: Any) -> None:
    class Budget:
        @hookimpl
        def ksi_admit(self, request: CompletionRequest) -> None:
            raise BudgetExceeded("agent planner spent its 5.00 USD of today")

    j = Journal()
    p = FakeProvider("p")
    async with make_host(DirectQueue(), ScriptedProviders(p), Budget(), j) as host:
        r = await host.complete({"model": "m", "prompt": "hi"})
    assert r.error == {"type": "BudgetExceeded", "message": "agent planner spent its 5.00 USD of today"}
    assert not p.calls and ("attempt_finished", 1, "p", "BudgetExceeded", None, None) in j.log


async def test_a_cancel_mid_call_records_the_call_as_unknown_and_tells_the_observers(make_host: Any) -> None:
    j = Journal()
    release = asyncio.Event()

    class Hangs(FakeProvider):
        async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> Any:
            await release.wait()
            return await super().complete(request, timeout_s=timeout_s)

    async with make_host(DirectQueue(), ScriptedProviders(Hangs("p")), j) as host:
        task = asyncio.ensure_future(host.execute(CompletionRequest.from_dict({"model": "m", "prompt": "hi"})))
        while "started" not in [e[0] for e in j.log]:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # stop() waited for the background report
    assert [e[0] for e in j.log][-2:] == ["record", "attempt_finished"]
    assert j.log[-2][2] == "unknown" and j.log[-1][3] == "Cancelled" and j.log[-1][4] == "unknown"


async def test_an_observers_operational_error_is_logged_and_changes_nothing(make_host: Any, caplog: Any) -> None:
    class Grumpy:
        @hookimpl
        def ksi_request_finished(self, result: Any) -> None:
            raise ProviderUnavailable("the audit store is down")

    j = Journal()
    caplog.set_level(logging.WARNING, "ksi_host.hooks")
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p")), j, Grumpy()) as host:
        r = await host.complete({"model": "m", "prompt": "hi"})
    assert r.ok and j.log[-1][0] == "request_finished"  # the other observer still heard
    assert "the audit store is down" in caplog.text and "Grumpy" in caplog.text


async def test_an_observers_programming_error_propagates_naming_it(make_host: Any) -> None:
    class Buggy:
        @hookimpl
        def ksi_attempt_finished(self, attempt: Any) -> None:
            raise KeyError("bug")

    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p")), Buggy()) as host:
        with pytest.raises(KeyError) as e:
            await host.complete({"model": "m", "prompt": "hi"})
    assert "raised by plugin 'Buggy' in hook ksi_attempt_finished" in e.value.__notes__


async def test_a_misspelt_hook_stops_start_up_naming_the_plugin_and_the_hook(make_host: Any) -> None:
    class Typo:
        @hookimpl
        def ksi_enqeue(self, request: Any) -> None: ...

    with pytest.raises(PluginLoadError, match=r"plugin 'Typo' implements 'ksi_enqeue'.*did you mean ksi_enqueue"):
        async with make_host(Typo()):
            pass


def test_the_hook_caller_reads_pluggy_once_per_hook_even_when_nothing_implements_it() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    hooks = HookCaller(pm)
    first = hooks.impls("ksi_admit")
    assert first == () and not hooks.implemented("ksi_admit")
    assert hooks.impls("ksi_admit") is first  # the empty answer was kept, not read again


async def test_the_result_model_is_what_answered(make_host: Any) -> None:
    class Renames(FakeProvider):
        async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> Any:
            return attrs.evolve(await super().complete(request, timeout_s=timeout_s), model="m-2024-08-06")

    async with make_host(DirectQueue(), ScriptedProviders(Renames("p"))) as host:
        r = await host.complete({"model": "m", "prompt": "hi"})
    assert r.model == "m-2024-08-06"
    assert Usage(1, 2, 3).total_tokens == 3


class LocalQueue(DirectQueue):
    """A queue with its own start-up, as ksi-queue has."""

    def __init__(self) -> None:
        super().__init__()
        self.started = False

    @hookimpl
    def ksi_startup(self) -> None:
        self.started = True


class SharedQueue(DirectQueue):
    """Takes the queue over when its table is configured, as a shared (Postgres) queue would."""

    def __init__(self) -> None:
        super().__init__()
        self.enqueued = 0

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        @attrs.define
        class SharedConfig:
            dsn_env: str | None = None

        return "shared", SharedConfig

    @hookimpl
    def ksi_exclusive_hooks(self, host: Any) -> list[str] | None:
        return ["ksi_enqueue"] if host.config["shared"].dsn_env else None

    @hookimpl
    def ksi_enqueue(self, host: Any, request: CompletionRequest) -> Any:
        self.enqueued += 1
        return super().ksi_enqueue(host, request)


async def test_a_configured_plugin_takes_hooks_over_and_the_plugin_left_idle_is_not_started(make_host: Any) -> None:
    local, shared = LocalQueue(), SharedQueue()
    async with make_host(local, shared, ScriptedProviders(FakeProvider("p")),
                         config={"shared": {"dsn_env": "PG_DSN"}}) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
        assert [p.name for p in host.plugins] == ["SharedQueue", "ScriptedProviders"]
    assert shared.enqueued == 1 and not local.tasks and not local.started


async def test_an_unconfigured_plugin_takes_nothing_over(make_host: Any) -> None:
    local, shared = LocalQueue(), SharedQueue()
    async with make_host(shared, local, ScriptedProviders(FakeProvider("p"))) as host:  # local is asked first
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
    assert local.started and shared.enqueued == 0


async def test_two_plugins_claiming_one_hook_stop_start_up(make_host: Any) -> None:
    class Other(SharedQueue):
        @hookimpl
        def ksi_config_spec(self) -> None:  # shares SharedQueue's table
            return None

    with pytest.raises(Exception, match="both claim ksi_enqueue"):
        async with make_host(SharedQueue(), Other(), config={"shared": {"dsn_env": "X"}}):
            pass


async def test_request_details_merge_every_plugins_sections_and_none_when_nobody_knows(make_host: Any) -> None:
    class Store:
        @hookimpl
        def ksi_request_details(self, request_id: str) -> dict[str, Any] | None:
            return {"request": {"request_id": request_id}, "state": "ok"} if request_id == "r1" else None

    class Ledger:
        @hookimpl
        def ksi_request_details(self, request_id: str) -> dict[str, Any] | None:
            return {"calls": [{"request_id": request_id, "outcome": "ok"}]} if request_id == "r1" else None

    async with make_host(DirectQueue(), Store(), Ledger()) as host:
        details = await host.request_details("r1")
        assert details == {"request": {"request_id": "r1"}, "state": "ok", "calls": [{"request_id": "r1", "outcome": "ok"}]}
        assert await host.request_details("nope") is None


async def test_listing_requests_needs_a_plugin_that_keeps_them(make_host: Any) -> None:
    from ksi_host import MissingPluginError, RequestQuery

    class Keeper:
        @hookimpl
        def ksi_list_requests(self, query: RequestQuery) -> list[dict[str, Any]]:
            return [{"request_id": f"r{i}", "status": query.status} for i in range(query.limit)]

    async with make_host(DirectQueue(), Keeper()) as host:
        assert [r["request_id"] for r in await host.list_requests(RequestQuery(limit=2, status="error"))] == ["r0", "r1"]
    async with make_host(DirectQueue()) as host:
        with pytest.raises(MissingPluginError, match="ksi_list_requests"):
            await host.list_requests()
    with pytest.raises(ValueError):
        RequestQuery(status="weird")


async def test_a_cut_short_attempt_whose_record_fails_is_logged_at_stop_not_lost_in_a_task(make_host: Any, caplog: Any) -> None:
    from ksi_host import DatabaseError

    release = asyncio.Event()

    class Hangs(FakeProvider):
        async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> Any:
            await release.wait()
            return await super().complete(request, timeout_s=timeout_s)

    class FullDisk:
        @hookimpl
        def ksi_attempt_started(self, call: Any) -> None:
            pass

        @hookimpl
        def ksi_record_usage(self, call: Any) -> None:
            raise DatabaseError("k.db", "database or disk is full")

    caplog.set_level(logging.WARNING, "ksi_host")
    async with make_host(DirectQueue(), ScriptedProviders(Hangs("p")), FullDisk()) as host:
        task = asyncio.ensure_future(host.execute(CompletionRequest.from_dict({"model": "m", "prompt": "hi"})))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "the record of an attempt cut short was lost: DatabaseError" in caplog.text



async def test_a_ledger_row_that_cannot_be_written_before_the_call_is_not_the_requests_result(make_host: Any) -> None:
    """The disk is full when ksi_attempt_started writes the call's row: nothing was sent, and the database failed, so
    host.execute raises (the queue keeps the request stored unfinished: it runs at the next start). Before, the error
    became the attempt's outcome and the request's final error result, which a rerun then answered from the store."""
    from ksi_host import DatabaseError

    class FullDisk:
        @hookimpl
        def ksi_attempt_started(self, call: Any) -> None:
            raise DatabaseError("k.db", "database or disk is full")

    provider = FakeProvider("p")
    async with make_host(DirectQueue(), ScriptedProviders(provider), FullDisk()) as host:
        with pytest.raises(DatabaseError, match="database or disk is full"):
            await host.execute(CompletionRequest.from_dict({"model": "m", "prompt": "hi"}))
    assert provider.calls == []

async def test_a_plugin_that_loses_its_hooks_and_only_observes_besides_is_not_started_but_observers_are(make_host: Any) -> None:
    class ObservingQueue(LocalQueue):
        @hookimpl
        def ksi_request_finished(self, result: Any) -> None: ...

    class Audit:  # lost nothing: an observer only, it stays
        def __init__(self) -> None:
            self.seen: list[str] = []

        @hookimpl
        def ksi_request_finished(self, result: Any) -> None:
            self.seen.append(result.status)

    local, shared, audit = ObservingQueue(), SharedQueue(), Audit()
    async with make_host(local, shared, audit, ScriptedProviders(FakeProvider("p")),
                         config={"shared": {"dsn_env": "PG_DSN"}}) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
        assert "ObservingQueue" not in [p.name for p in host.plugins]
    assert not local.started and audit.seen == ["ok"]
