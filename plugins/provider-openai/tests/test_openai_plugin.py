"""The openai plugin through a Host: config, selection, failover, circuits, status, order between provider plugins."""

from __future__ import annotations

from typing import Any

import pytest
from ksi_provider_openai.plugin import Plugin
from openai_helpers import KEY_ENV, FailOver, FakeClock, deployment

from ksi_host import ConfigError, ProviderInfo, ProviderUnavailable, hookimpl
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

REQ = {"model": "gpt-test", "prompt": "hi"}


async def test_request_through_the_host(oa_host: Any, openai_server: Any) -> None:
    async with oa_host() as host:
        r = await host.complete({**REQ, "session_id": "s1"})
        assert r.ok, r.error
        assert (r.text, r.provider, r.session_id) == ("echo: hi", "main", "s1")
        assert r.usage.total_tokens == 6
        assert [a.provider for a in r.attempts] == ["main"]
        client = host.pm.get_plugin("Plugin").client
        assert client.open
    assert not client.open  # ksi_shutdown closed the pooled client


async def test_unserved_model_is_no_provider(oa_host: Any) -> None:
    async with oa_host() as host:
        r = await host.complete({"model": "other", "prompt": "hi"})
        assert r.error["type"] == "NoProviderError"
        assert "gpt-test" in r.error["message"]


async def test_fails_over_in_the_order_written(oa_host: Any, openai_server: Any) -> None:
    deps = [deployment(openai_server, "first"), deployment(openai_server, "second")]
    policy = FailOver()
    async with oa_host(policy, deployments=deps) as host:
        openai_server.script("503")
        r = await host.complete(REQ)
        assert r.ok and r.provider == "second"
        assert [(a.provider, a.error_type) for a in r.attempts] == [("first", "ProviderUnavailable"), ("second", None)]
        assert openai_server.hits == 2


async def test_circuit_opens_skips_then_half_open_trial_closes_it(oa_host: Any, openai_server: Any) -> None:
    clock = FakeClock()
    deps = [deployment(openai_server, "first"), deployment(openai_server, "second")]
    async with oa_host(FailOver(), deployments=deps, table={"circuit": {"failures_to_open": 2, "cooldown_s": 10}},
                       clock=clock) as host:
        openai_server.script("500", "ok", "500", "ok")
        for _ in range(2):  # two failures of "first" (each request fails over to "second")
            r = await host.complete(REQ)
            assert r.provider == "second"
        infos = {p.name: p for p in await host.providers("gpt-test")}
        assert infos["first"].state == "open" and infos["second"].state == "closed"
        assert "500" in infos["first"].detail["last_error"]
        openai_server.reset()
        r = await host.complete(REQ)
        assert [a.provider for a in r.attempts] == ["second"]  # skipped while open
        clock.advance(10)
        r = await host.complete(REQ)
        assert r.provider == "first"  # the half-open trial succeeded
        assert {p.name: p.state for p in await host.providers("gpt-test")}["first"] == "closed"


async def test_bad_request_does_not_count_against_the_deployment(oa_host: Any, openai_server: Any) -> None:
    async with oa_host(table={"circuit": {"failures_to_open": 1}}) as host:
        openai_server.script("400", "context_length")
        assert (await host.complete(REQ)).error["type"] == "BadRequest"
        assert (await host.complete(REQ)).error["type"] == "ContextWindowExceeded"
        assert [p.state for p in await host.providers("gpt-test")] == ["closed"]


async def test_all_circuits_open_fails_fast_without_calling_upstream(oa_host: Any, openai_server: Any) -> None:
    async with oa_host(table={"circuit": {"failures_to_open": 1, "cooldown_s": 60}}, clock=FakeClock()) as host:
        openai_server.script("503")
        assert (await host.complete(REQ)).error["type"] == "ProviderUnavailable"
        openai_server.reset()
        plugin = host.pm.get_plugin("Plugin")
        with pytest.raises(ProviderUnavailable) as info:
            plugin.pool.select("gpt-test")
        assert info.value.retry_after == pytest.approx(60)
        r = await host.complete(REQ)
        assert r.error["type"] == "ProviderUnavailable" and "open circuit" in r.error["message"]
        assert openai_server.hits == 0


async def test_list_providers_and_status_show_priority_and_no_secret(oa_host: Any, openai_server: Any, api_key: str) -> None:
    async with oa_host(table={"priority": 7}) as host:
        (info,) = await host.providers(None)
        assert (info.name, info.model, info.plugin, info.state) == ("main", "gpt-test", "openai", "closed")
        assert info.priority == 7 and info.detail["api_key_env"] == KEY_ENV
        assert "priority" not in info.detail  # a fact of the plugin, on ProviderInfo only
        assert info.detail["url"] == openai_server.url + "/chat/completions"
        status = await host.status()
        assert status["openai"]["priority"] == 7
        assert [c["name"] for c in status["openai"]["circuits"]] == ["main"]
        assert api_key not in repr(status) and api_key not in repr(info)


@pytest.mark.parametrize(
    ("deployment_keys", "words"),
    [
        ({"api_base": "localhost:8000/v1"}, "api_base must be an http:// or https:// URL"),
        ({"api_key_env": "sk-live-abcdef0123456789"}, "name of the environment variable"),
        ({"headers": {"Authorization": "Bearer x"}}, "may not set 'Authorization'"),
        ({"headers": {"X-Api-Key": "abc"}}, "may not set 'X-Api-Key'"),
        ({"headers": {"X-Token": "sk-live-abcdef0123456789"}}, "headers.X-Token looks like it holds a secret"),
        ({"input_cost_per_mtok": -1}, "input_cost_per_mtok"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"surprise": 1}, "openai.deployments[0].surprise: unknown key"),
        # values that validated, then crashed or misbehaved at run time
        ({"headers": {"X-Title": "a\r\nX-Evil: 1"}}, "headers.X-Title must be printable ASCII"),
        ({"api_base": "http://user:sk-live-pw@127.0.0.1:1/v1"}, "api_base must not hold credentials"),
        ({"api_base": "http://[fe80::1]/v1"}, "api_base points at a link-local address"),
        ({"timeout_s": float("inf")}, "timeout_s must be a number of seconds > 0"),
        ({"input_cost_per_mtok": float("nan")}, "input_cost_per_mtok must be a number of USD"),
        ({"output_cost_per_mtok": float("inf")}, "output_cost_per_mtok must be a number of USD"),
    ],
)
async def test_bad_config_stops_start_up_naming_the_key(make_host: Any, openai_server: Any, deployment_keys: dict,
                                                        words: str) -> None:
    d = {**deployment(openai_server), **deployment_keys}
    with pytest.raises(ConfigError) as info:
        async with make_host(Plugin(), config={"openai": {"deployments": [d]}}):
            pass
    assert words in str(info.value) and "openai.deployments[0]" in str(info.value)
    assert "sk-live" not in str(info.value)


async def test_duplicate_deployment_names_are_refused(make_host: Any, openai_server: Any) -> None:
    d = deployment(openai_server)
    with pytest.raises(ConfigError, match="used by two deployments"):
        async with make_host(Plugin(), config={"openai": {"deployments": [d, d]}}):
            pass


# -- the order between provider plugins serving one model ---------------------------------------


def other_plugin(*script: Any) -> tuple[ScriptedProviders, FakeProvider]:
    """Another provider plugin (ProviderInfo.plugin == "fake", no priority: ranks at 100) serving gpt-test."""
    fake = FakeProvider("fake-1", "gpt-*", script=script or ("from fake",))
    return ScriptedProviders(fake), fake


@pytest.mark.parametrize("registered_first", ["openai", "other"])
async def test_config_priority_decides_which_plugin_answers(oa_host: Any, make_host: Any, openai_server: Any,
                                                            registered_first: str) -> None:
    # registration order must not matter: the host asks the plugins by rank
    for priority, want in ((1, "main"), (100, "fake-1"), (200, "fake-1")):  # ties rank by name: "fake" < "openai"
        other, _ = other_plugin()
        plugins = [Plugin(), other] if registered_first == "openai" else [other, Plugin()]
        cfg = {"openai": {"priority": priority, "deployments": [deployment(openai_server)]}}
        async with make_host(*plugins, DirectQueue(), config=cfg) as host:
            r = await host.complete(REQ)
            assert r.ok and r.provider == want, (priority, r)


async def test_preferred_plugin_failing_over_to_the_other(oa_host: Any, openai_server: Any) -> None:
    other, fake = other_plugin()
    async with oa_host(other, FailOver(), table={"priority": 1}) as host:
        openai_server.script("503")
        r = await host.complete(REQ)
        assert [(a.provider, a.error_type) for a in r.attempts] == [("main", "ProviderUnavailable"), ("fake-1", None)]
        assert r.text == "from fake"


async def test_deferring_plugin_answers_when_the_preferred_one_failed(oa_host: Any, openai_server: Any) -> None:
    other, fake = other_plugin(ProviderUnavailable("fake down", provider="fake-1"))
    async with oa_host(other, FailOver(), table={"priority": 500}) as host:
        r = await host.complete(REQ)
        assert [(a.provider, a.error_type) for a in r.attempts] == [("fake-1", "ProviderUnavailable"), ("main", None)]
        assert r.text == "echo: hi"


class OpenCircuitOther(ScriptedProviders):
    """Another provider plugin whose only deployment is behind an open circuit."""

    @hookimpl
    def ksi_list_providers(self, model: str | None) -> list[ProviderInfo]:
        return [ProviderInfo("fake-2", "gpt-*", "fake", "open")]

    @hookimpl
    def ksi_select_provider(self, request: Any, exclude: Any) -> Any:
        raise ProviderUnavailable("fake-2 has an open circuit", provider="fake-2", retry_after=30.0)


async def test_deferring_plugin_answers_when_the_preferred_ones_circuit_is_open(oa_host: Any, openai_server: Any) -> None:
    async with oa_host(OpenCircuitOther(FakeProvider("fake-2", "gpt-*")), table={"priority": 500}) as host:
        r = await host.complete(REQ)
        assert r.provider == "main"


async def test_a_priority_in_the_other_plugins_info_is_honoured(oa_host: Any, openai_server: Any) -> None:
    class Ranked(ScriptedProviders):
        @hookimpl
        def ksi_list_providers(self, model: str | None) -> list:
            return [ProviderInfo("zz-1", "gpt-*", "zz", priority=5)]

    async with oa_host(Ranked(FakeProvider("zz-1", "gpt-*", script=("from zz",))), table={"priority": 6}) as host:
        assert (await host.complete(REQ)).provider == "zz-1"
    async with oa_host(Ranked(FakeProvider("zz-1", "gpt-*")), table={"priority": 5}) as host:
        assert (await host.complete(REQ)).provider == "main"  # tie at 5: "openai" < "zz"


async def test_preferred_plugin_with_open_circuits_yields_to_the_other(oa_host: Any, openai_server: Any) -> None:
    other, fake = other_plugin()
    async with oa_host(other, table={"priority": 1, "circuit": {"failures_to_open": 1, "cooldown_s": 60}},
                       clock=FakeClock()) as host:
        openai_server.script("503")
        assert (await host.complete(REQ)).error["type"] == "ProviderUnavailable"  # no failover policy: final
        r = await host.complete(REQ)  # "main" is open: the other plugin serves at once, no failed attempt
        assert r.ok and [a.provider for a in r.attempts] == ["fake-1"]
        assert openai_server.hits == 1


async def test_circuits_survive_a_restart(oa_host: Any, openai_server: Any, ksi_db_path: Any) -> None:
    table = {"circuit": {"failures_to_open": 1, "cooldown_s": 600}}
    async with oa_host(table=table) as host:
        openai_server.script("500")
        assert (await host.complete(REQ)).error["type"] == "ProviderUnavailable"
    async with oa_host(table=table) as host:  # same database, a new host
        (info,) = await host.providers("gpt-test")
        assert info.state == "open" and "500" in info.detail["last_error"]
        r = await host.complete(REQ)
        assert "open circuit" in r.error["message"] and openai_server.hits == 1
