"""ksi_host.providers.deployments: Deployment config, matching, and the ordered selection with circuits."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest

from ksi_host.config import build_table
from ksi_host.errors import AuthFailed, BadRequest, ConfigError, OperationalError, ProviderUnavailable
from ksi_host.models import CompletionRequest, ProviderResponse, Usage
from ksi_host.providers import (
    DEFAULT_PRIORITY,
    CircuitBreaker,
    CircuitStore,
    Deployment,
    DeploymentPool,
    ProviderPlugin,
    check_unique_names,
    is_pattern,
)
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@attrs.define
class Member:
    deployment: Deployment
    breaker: CircuitBreaker


def pool(*specs: tuple[str, str], clock: Clock | None = None, failures: int = 1, cooldown: float = 10) -> DeploymentPool[Any]:
    clock = clock or Clock()
    return DeploymentPool(
        [Member(Deployment(name, model, timeout_s=5), CircuitBreaker(failures, cooldown, clock=clock)) for name, model in specs],
        wall_clock=lambda: 1_700_000_000.0,
    )


def test_matching_exact_and_glob() -> None:
    assert Deployment("a", "gpt-4o").matches("gpt-4o")
    assert not Deployment("a", "gpt-4o").matches("gpt-4o-mini")
    assert Deployment("a", "gpt-4o*").matches("gpt-4o-mini")
    assert Deployment("a", "openai/*").matches("openai/x")
    assert not Deployment("a", "GPT-*").matches("gpt-4")  # case-sensitive
    assert Deployment("a", "model-[ab]").matches("model-b")
    assert is_pattern("x*") and not is_pattern("x")


def test_validation() -> None:
    with pytest.raises(ValueError, match="name"):
        Deployment("", "m")
    with pytest.raises(ValueError, match="timeout_s"):
        Deployment("a", "m", timeout_s=0)
    with pytest.raises(ValueError, match="never the key itself") as info:
        Deployment("a", "m", api_key_env="sk-live-abc")
    assert "sk-live-abc" not in str(info.value)
    assert Deployment("a", "m", timeout_s=3).timeout_s == 3.0
    assert Deployment("a", "m", timeout_s=None).timeout_s is None


def test_config_table_builds_and_names_unknown_keys() -> None:
    d = build_table(Deployment, {"name": "a", "model": "m", "timeout_s": 5, "api_key_env": "K"}, "x.deployments[0]")
    assert d == Deployment("a", "m", api_key_env="K", timeout_s=5.0)
    with pytest.raises(ConfigError, match="api_key"):
        build_table(Deployment, {"name": "a", "model": "m", "api_key": "K"}, "x.deployments[0]")


def test_api_key_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Deployment("a", "m", api_key_env="KSI_TEST_DEPLOYMENT_KEY")
    monkeypatch.setenv("KSI_TEST_DEPLOYMENT_KEY", "k1")
    assert d.api_key() == "k1"
    monkeypatch.delenv("KSI_TEST_DEPLOYMENT_KEY")
    with pytest.raises(AuthFailed, match="KSI_TEST_DEPLOYMENT_KEY") as info:
        d.api_key()
    assert info.value.provider == "a"
    assert Deployment("a", "m").api_key() is None


def test_unique_names() -> None:
    check_unique_names([Deployment("a", "m"), Deployment("b", "m")])
    with pytest.raises(ValueError, match=r"deployments\[1\].name 'a'"):
        check_unique_names([Deployment("a", "m"), Deployment("a", "n")])
    with pytest.raises(ValueError, match="deployments\\[0\\].name 'mock' is reserved for the built-in"):
        check_unique_names([Deployment("mock", "m")], reserved={"mock": "for the built-in"})
    with pytest.raises(ValueError):
        pool(("a", "m"), ("a", "m"))


def test_select_in_order_skipping_excluded() -> None:
    p = pool(("a", "gpt-*"), ("b", "gpt-4o"), ("c", "claude"))
    assert p.select("gpt-4o").deployment.name == "a"
    assert p.select("gpt-4o", {"a"}).deployment.name == "b"
    assert p.select("gpt-4o", {"a", "b"}) is None
    assert p.select("gpt-3").deployment.name == "a"
    assert p.select("llama") is None
    assert [m.deployment.name for m in p.serving("gpt-4o")] == ["a", "b"]
    assert p.get("c") is not None and p.get("zzz") is None and len(p) == 3


def test_select_skips_open_circuits_and_fails_fast_when_all_are_open() -> None:
    clock = Clock()
    p = pool(("a", "m"), ("b", "m"), clock=clock)
    p.get("a").breaker.record_failure()
    assert p.select("m").deployment.name == "b"
    clock.t = 4
    p.get("b").breaker.record_failure()
    with pytest.raises(ProviderUnavailable) as info:
        p.select("m")
    assert info.value.retry_after == pytest.approx(6)
    assert "a (open, 6.0s" in info.value.message and "b (open, 10.0s" in info.value.message
    clock.t = 10
    assert p.select("m").deployment.name == "a"  # a's trial
    assert p.get("a").breaker.state == "half_open"
    with pytest.raises(ProviderUnavailable) as info:  # a's trial is out, b still cooling down
        p.select("m")
    assert "trial call in flight" in info.value.message
    clock.t = 10 + 6  # the trial's lease (timeout_s 5 + 1) ended without an outcome
    assert p.select("m").deployment.name == "a"


def test_infos_and_status() -> None:
    clock = Clock()
    p = pool(("a", "gpt-*"), ("b", "claude"), clock=clock)
    p.get("a").breaker.record_failure(error="RateLimited: slow")
    infos = p.infos("gpt-4", "myplugin")
    assert [(i.name, i.model, i.plugin, i.state, i.available) for i in infos] == [("a", "gpt-*", "myplugin", "open", False)]
    assert infos[0].detail["cooldown_left_s"] == 10
    assert infos[0].detail["opens_until"] == "2023-11-14T22:13:30.000Z"
    assert [i.name for i in p.infos(None, "myplugin")] == ["a", "b"]
    status = p.status()
    assert status[0]["name"] == "a" and status[0]["state"] == "open" and status[0]["last_error"] == "RateLimited: slow"
    assert (status[1]["state"], status[1]["failures"], status[1]["opens_until"]) == ("closed", 0, None)
    assert "api_key" not in status[0] and status[0]["api_key_env"] is None


async def test_circuits_persist_and_restore(tmp_path: Any) -> None:
    from ksi_host.db import Database

    wall = [1_700_000_000.0]
    clock = Clock()

    def make() -> DeploymentPool[Any]:
        return DeploymentPool(
            [Member(Deployment(n, "m", api_key_env="K"), CircuitBreaker(2, 30, clock=clock)) for n in ("a", "b")],
            wall_clock=lambda: wall[0],
        )

    async with Database(tmp_path / "c.db") as db:
        p = make()
        store = CircuitStore(db, "test_circuits")
        await store.attach(p)
        p.get("a").breaker.record_failure(error="ProviderUnavailable: down")
        p.get("a").breaker.record_failure(error="ProviderUnavailable: down")
        p.get("b").breaker.record_failure(error="RateLimited: slow")
        await store.flush()
        rows = {r[0]: tuple(r) for r in await db.fetchall("SELECT name, state, failures, opens_until, opens FROM test_circuits")}
        assert rows == {"a": ("a", "open", 2, wall[0] + 30, 1), "b": ("b", "closed", 1, None, 0)}
        p.get("b").breaker.record_success()
        await store.detach()
        assert (await db.fetchone("SELECT failures FROM test_circuits WHERE name = 'b'"))[0] == 0
        p.get("b").breaker.record_failure()  # detached: no longer written
        assert p.get("b").breaker.on_change is None

        wall[0] += 10  # another process, 10 s later
        q = make()
        await CircuitStore(db, "test_circuits").attach(q)
        a = q.get("a").breaker
        assert a.state == "open" and a.failures == 2 and a.opens == 1
        assert a.cooldown_left() == pytest.approx(20)
        assert a.last_error == "ProviderUnavailable: down"
        assert q.get("b").breaker.state == "closed"
        wall[0] += 60
        r = make()
        await CircuitStore(db, "test_circuits").attach(r)
        assert r.get("a").breaker.state == "half_open"  # the cool-down ended while nobody ran: trial due
        with pytest.raises(ValueError, match="identifier"):
            CircuitStore(db, "bad table")


def test_the_pool_priority_is_on_provider_info_not_in_detail() -> None:
    p = pool(("a", "m"))
    assert p.priority == DEFAULT_PRIORITY and p.infos("m", "x")[0].priority == DEFAULT_PRIORITY
    ranked = DeploymentPool(p.members, priority=5)
    (info,) = ranked.infos("m", "x")
    assert info.priority == 5 and "priority" not in info.detail
    assert "priority" not in ranked.status()[0]


# -- ProviderPlugin: the hooks every provider plugin shares ------------------------------


@attrs.define
class TinyConfig:
    deployments: list[Deployment] = attrs.field(factory=list)
    priority: int = DEFAULT_PRIORITY


class TinyProvider:
    """A provider object of a tiny provider plugin: one script of answers per deployment."""

    def __init__(self, deployment: Deployment, breaker: CircuitBreaker, answer: BaseException | str) -> None:
        self.deployment, self.breaker, self.name, self.timeout_s = deployment, breaker, deployment.name, 5.0
        self.answer = answer

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse:
        generation = self.breaker.generation
        if isinstance(self.answer, OperationalError):
            self.breaker.record_attempt_error(generation, self.answer, name=self.name, log=logging.getLogger("tiny"))
            raise self.answer
        self.breaker.record_success(generation)
        return ProviderResponse(str(self.answer), usage=Usage(1, 1, 2, None))


class TinyPlugin(ProviderPlugin):
    TABLE = "tiny"
    CONFIG = TinyConfig
    CIRCUITS_TABLE = "tiny_circuits"

    def __init__(self, answers: dict[str, BaseException | str]) -> None:
        super().__init__()
        self.answers = answers
        self.started = self.stopped = 0

    def build_pool(self, config: TinyConfig, host: Any) -> DeploymentPool[TinyProvider]:
        return DeploymentPool([TinyProvider(d, CircuitBreaker(1, 60, clock=host.clock), self.answers[d.name])
                               for d in config.deployments], priority=config.priority)

    async def start(self, host: Any) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1


async def test_provider_plugin_hooks_are_found_on_a_subclass(make_host: Any) -> None:
    plugin = TinyPlugin({"down": ProviderUnavailable("gone", provider="down"), "up": "hello"})
    config = {"tiny": {"deployments": [{"name": "down", "model": "m"}, {"name": "up", "model": "m"}], "priority": 7}}
    async with make_host(DirectQueue(), plugin, config=config) as host:
        impls = {name: [getattr(i.function, "__self__", None) for i in host.hooks.impls(name)]
                 for name in ("ksi_config_spec", "ksi_startup", "ksi_shutdown", "ksi_select_provider",
                              "ksi_list_providers", "ksi_status")}
        assert all(plugin in found for found in impls.values()), impls
        assert plugin.started == 1 and plugin.pool is not None
        assert (await host.complete({"model": "m", "prompt": "hi"})).provider == "down"  # failed, no retry plugin
        r = await host.complete({"model": "m", "prompt": "hi"})  # down's circuit is open: the next one
        assert r.ok and r.text == "hello" and r.provider == "up"
        infos = await host.providers("m")
        assert [(i.name, i.plugin, i.state, i.priority) for i in infos] == [
            ("down", "tiny", "open", 7), ("up", "tiny", "closed", 7)]
        status = await host.status()
        assert [c["name"] for c in status["circuits"]] == ["down", "up"]
        await plugin.circuits.flush()
        rows = await host.db.fetchall("SELECT name, state FROM tiny_circuits ORDER BY name")
        assert [tuple(r) for r in rows] == [("down", "open")]
    assert plugin.stopped == 1


class Other(TinyPlugin):
    TABLE = "other"
    CIRCUITS_TABLE = "other_circuits"


async def test_the_host_asks_the_better_ranked_plugin_first_whatever_the_registration_order(make_host: Any) -> None:
    config = {"tiny": {"deployments": [{"name": "a", "model": "m"}], "priority": 50},
              "other": {"deployments": [{"name": "b", "model": "m"}], "priority": 10}}
    for order in ((0, 1), (1, 0)):
        plugins = [TinyPlugin({"a": "from a"}), Other({"b": "from b"})]
        picked = [plugins[i] for i in order]
        # a plain selector that lists nothing for m, registered last (asked first in hook order), comes after both
        async with make_host(DirectQueue(), *picked, ScriptedProviders(FakeProvider("fake")), config=config) as host:
            assert (await host.complete({"model": "m", "prompt": "hi"})).text == "from b"  # priority 10 before 50
            assert (await host.complete({"model": "x", "prompt": "hi"})).provider == "fake"  # neither serves x


async def test_the_next_plugin_takes_over_when_the_better_ones_circuits_open(make_host: Any) -> None:
    best = Other({"b": "from b"})
    worse = TinyPlugin({"a": "from a"})
    config = {"tiny": {"deployments": [{"name": "a", "model": "m"}], "priority": 50},
              "other": {"deployments": [{"name": "b", "model": "m"}], "priority": 10}}
    async with make_host(DirectQueue(), worse, best, config=config) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).text == "from b"
        best.pool.members[0].answer = ProviderUnavailable("b is down", provider="b")
        failed = await host.complete({"model": "m", "prompt": "hi"})  # its circuit opens (one failure)
        assert (failed.provider, failed.status) == ("b", "error")
        taken_over = await host.complete({"model": "m", "prompt": "hi"})
        assert (taken_over.provider, taken_over.text) == ("a", "from a")


async def test_a_half_open_trial_in_flight_does_not_end_the_request_without_a_provider(make_host: Any) -> None:
    """The bug of issue 15: A (priority 1) has one deployment, half-open with its trial call in flight; B
    (priority 2) serves the same model. Each plugin deferred to the other and the request ended with a final
    NoProviderError. Now the host asks A, which has nothing usable (its trial is out), then B, which serves."""
    clock = [1000.0]

    class Slow(TinyPlugin):
        def build_pool(self, config: TinyConfig, host: Any) -> DeploymentPool[TinyProvider]:
            return DeploymentPool([TinyProvider(d, CircuitBreaker(1, 30, clock=lambda: clock[0]), self.answers[d.name])
                                   for d in config.deployments], priority=config.priority)

    a = Slow({"a": ProviderUnavailable("a is down", provider="a")})
    b = Other({"b": "from b"})
    config = {"tiny": {"deployments": [{"name": "a", "model": "m"}], "priority": 1},
              "other": {"deployments": [{"name": "b", "model": "m"}], "priority": 2}}
    async with make_host(DirectQueue(), a, b, config=config) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).provider == "a"  # fails: a's circuit opens
        clock[0] += 31  # the cool-down is over: a is half-open
        breaker = a.pool.members[0].breaker
        assert breaker.state == "half_open" and breaker.try_acquire(60)  # its one trial call is now in flight
        r = await host.complete({"model": "m", "prompt": "hi"})
        assert (r.status, r.provider, r.text) == ("ok", "b", "from b"), r.error


async def test_when_every_plugin_is_behind_open_circuits_the_shortest_cool_down_is_the_retry_after(make_host: Any) -> None:
    a = TinyPlugin({"a": ProviderUnavailable("a is down", provider="a")})
    b = Other({"b": ProviderUnavailable("b is down", provider="b")})
    config = {"tiny": {"deployments": [{"name": "a", "model": "m"}], "priority": 1},
              "other": {"deployments": [{"name": "b", "model": "m"}], "priority": 2}}
    async with make_host(DirectQueue(), a, b, config=config) as host:
        await host.complete({"model": "m", "prompt": "hi"})  # a fails and opens
        await host.complete({"model": "m", "prompt": "hi"})  # b fails and opens
        r = await host.complete({"model": "m", "prompt": "hi"})
        assert r.status == "error" and r.error["type"] == "ProviderUnavailable", r.error
        assert "open circuit" in r.error["message"] and r.attempts[0].provider is None


def test_record_attempt_error_logs_debug_and_the_opening(caplog: pytest.LogCaptureFixture) -> None:
    b = CircuitBreaker(2, 30, clock=Clock())
    log = logging.getLogger("ksi_host.provider.tiny")
    with caplog.at_level(logging.DEBUG, logger="ksi_host.provider.tiny"):
        assert not b.record_attempt_error(b.generation, BadRequest("bad", provider="d"), name="d", log=log)
        assert not b.record_attempt_error(b.generation, ProviderUnavailable("down", provider="d"), name="d", log=log)
        assert b.record_attempt_error(b.generation, ProviderUnavailable("down", provider="d"), name="d", log=log)
    assert b.state == "open" and b.failures == 2
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert debug == ["deployment d failed: BadRequest: bad"] + ["deployment d failed: ProviderUnavailable: down"] * 2
    assert warnings == ["circuit of deployment d opened after 2 consecutive failure(s) (last: ProviderUnavailable); "
                        "cool-down 30s"]
