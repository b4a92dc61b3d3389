"""The provider kit's config: ProviderConfig, the shared validators, where api_base may point, keys at start-up."""

from __future__ import annotations

import logging
import math
from typing import Any

import attrs
import pytest

from ksi_host import ConfigError, StartupError
from ksi_host.config import build_table
from ksi_host.providers import (
    CircuitBreaker,
    Deployment,
    DeploymentPool,
    ProviderConfig,
    ProviderPlugin,
    check_keys,
    deployments_field,
)
from ksi_host.providers.validators import check_url, http_headers, link_local_reason, opt_price
from ksi_host.testing import DirectQueue

# -- ProviderConfig ------------------------------------------------------------------------


@attrs.define(frozen=True)
class MyDeployment(Deployment):
    flavour: str = "plain"


@attrs.define(frozen=True)
class MyConfig(ProviderConfig):
    builtin: bool = True
    deployments: list[MyDeployment] = deployments_field()

    def reserved_names(self) -> dict[str, str]:
        return {"built-in": "for the built-in one (set builtin = false to use it)"} if self.builtin else {}


def my(data: dict[str, Any]) -> MyConfig:
    return build_table(MyConfig, data, "my")


def test_a_subclass_has_the_shared_keys_with_their_defaults_and_its_own_deployment_type() -> None:
    cfg = my({"deployments": [{"name": "a", "model": "m", "flavour": "spicy"}], "priority": 7,
              "circuit": {"failures_to_open": 2}})
    assert (cfg.priority, cfg.circuit.failures_to_open, cfg.circuit.cooldown_s, cfg.builtin) == (7, 2, 30.0, True)
    assert isinstance(cfg.deployments[0], MyDeployment) and cfg.deployments[0].flavour == "spicy"
    assert my({}).priority == 100


@pytest.mark.parametrize(("data", "words"), [
    ({"priority": "high"}, "my.priority: expected an integer"),
    ({"priority": True}, "my.priority: expected an integer"),
    ({"deployments": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}, "deployments[1].name 'a' is used by two"),
    ({"deployments": [{"name": "built-in", "model": "m"}]}, "'built-in' is reserved for the built-in one"),
    ({"circuit": {"cooldown_s": math.inf}}, "cooldown_s must be a number of seconds >= 0 and at most"),
    ({"circuit": {"cooldown_s": math.nan}}, "cooldown_s"),
    ({"circuit": {"failures_to_open": 0}}, "failures_to_open must be an integer >= 1"),
])
def test_the_shared_keys_are_checked(data: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        my(data)
    assert words in str(info.value)
    assert str(info.value).startswith(("config table my", "config key my."))


def test_a_reserved_name_is_free_when_the_builtin_is_off() -> None:
    assert my({"builtin": False, "deployments": [{"name": "built-in", "model": "m"}]}).deployments[0].name == "built-in"


# -- numbers, strings and headers --------------------------------------------------------------


@pytest.mark.parametrize("timeout", [math.inf, math.nan, -1.0, 0, 8 * 24 * 3600, "5"])
def test_timeout_must_be_finite_positive_and_at_most_a_week(timeout: Any) -> None:
    """``timeout_s = inf`` validated and then failed every call."""
    with pytest.raises(ConfigError) as info:
        build_table(Deployment, {"name": "a", "model": "m", "timeout_s": timeout}, "p.deployments[0]")
    assert "p.deployments[0]" in str(info.value) and "timeout_s" in str(info.value)


def test_good_numbers_pass() -> None:
    d = build_table(Deployment, {"name": "a", "model": "m", "timeout_s": 7 * 24 * 3600}, "p.deployments[0]")
    assert d.timeout_s == 604800.0
    assert Deployment("a", "m", timeout_s=None).timeout_s is None
    opt_price(None, attrs.fields(Deployment).name, 0)
    opt_price(None, attrs.fields(Deployment).name, None)


@pytest.mark.parametrize("price", [math.nan, math.inf, -0.1, 10_001.0, True, "1"])
def test_prices_must_be_finite_and_in_range(price: Any) -> None:
    """``input_cost_per_mtok = nan`` put NaN into results (invalid JSON) and ``cost $nan`` into the summary."""
    with pytest.raises(ValueError, match="USD per million tokens"):
        opt_price(None, attrs.fields(Deployment).name, price)


@pytest.mark.parametrize(("headers", "words"), [
    ({"X-Title": "line\r\nX-Injected: 1"}, "headers.X-Title must be printable ASCII"),
    ({"X-Title": "a\nb"}, "printable ASCII"),
    ({"X-Title": "tab\there"}, "printable ASCII"),
    ({"X-Title": "caf\u00e9"}, "printable ASCII"),
    ({"Bad Name": "x"}, "is not a valid header name"),
    ({"X-Bad\r\n": "x"}, "is not a valid header name"),
    ({"Authorization": "Bearer x"}, "may not set 'Authorization'"),
    ({"Proxy-Authorization": "x"}, "may not set"),
    ({"X-Token": "sk-live-abcdef0123456789"}, "looks like it holds a secret"),
])
def test_header_values_must_be_printable_and_free_of_secrets(headers: dict[str, str], words: str) -> None:
    """A CR/LF in a header value validated, then crashed the HTTP client (exit 70)."""
    with pytest.raises(ValueError) as info:
        http_headers(None, attrs.fields(Deployment).name.evolve(name="headers"), headers)
    assert words in str(info.value)
    assert "sk-live" not in str(info.value)


def test_good_headers_pass() -> None:
    http_headers(None, attrs.fields(Deployment).name.evolve(name="headers"),
                 {"HTTP-Referer": "https://example.org/x?y=1", "X-Title": "My app (v2) ~ 100%"})


@pytest.mark.parametrize("key", [
    "sk-proj-" + "a1B2" * 12,                        # not a name at all
    "gsk_" + "Xq7pL2mN9vR4tY8wZ3kJ6hB1cD5fG0sA2eI4uO7yT9rE3wQ1zX5v",  # Groq's shape: a valid name
    "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",  # Hugging Face's
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # hex, starting with a letter
])
def test_a_key_in_api_key_env_is_refused_without_repeating_it(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_table(Deployment, {"name": "a", "model": "m", "api_key_env": key}, "t.deployments[0]")
    assert "never the key itself" in str(e.value)
    assert not any(key[i:i + 12] in str(e.value) for i in range(len(key) - 11))


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "AZURE_OPENAI_API_KEY_WESTEUROPE2", "my_key_2", "KEY_FOR_PROJECT_20251128",
                                  "GROQ_API_KEY", "Openai_Key", "ANTHROPICAPIKEYFORTHEBATCHJOBS"])
def test_variable_names_pass(name: str) -> None:
    assert Deployment("a", "m", api_key_env=name).api_key_env == name


def test_names_and_models_without_control_characters() -> None:
    with pytest.raises(ValueError, match="name must not hold control characters"):
        Deployment("a\nb", "m")
    with pytest.raises(ValueError, match="model must not hold control characters"):
        Deployment("a", "m\x00")


# -- api_base ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "words"), [
    ("127.0.0.1:45425", "must be an http:// or https:// URL"),  # no scheme: litellm failed every call as an HTTP 500
    ("localhost:8000/v1", "must be an http:// or https:// URL"),
    ("file:///etc/passwd", "got one with scheme 'file'"),
    ("gopher://example.org/", "got one with scheme 'gopher'"),
    ("ftp://example.org/v1", "scheme 'ftp'"),
    ("http://", "must be an http:// or https:// URL"),
    ("http://host:99999/v1", "invalid port"),
    ("http://exa mple.org/v1", "spaces, line breaks or control characters"),
    ("http://example.org/v1\r\n", "spaces, line breaks or control characters"),
    ("http://b\u00fccher.example/v1", "xn--"),
])
def test_api_base_must_be_an_http_url(url: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        Deployment("a", "m", api_base=url)
    assert words in str(info.value)


@pytest.mark.parametrize("url", [
    "http://user:hunter2-password@example.org/v1",
    "https://:hunter2-password@example.org/v1",
    "user:hunter2-password@example.org/v1",
    "https://example.org/v1?api_key=hunter2-password",
    "https://example.org/v1?x=1&KEY=hunter2-password",
])
def test_credentials_in_api_base_are_refused_without_repeating_them(url: str) -> None:
    """They crashed aiohttp (exit 70), and ``ksi-host status`` printed the password."""
    with pytest.raises(ConfigError) as info:
        build_table(Deployment, {"name": "a", "model": "m", "api_base": url}, "openai.deployments[0]")
    message = str(info.value)
    assert "openai.deployments[0]" in message and "api_base" in message and "credentials" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.170.2/v2/credentials",
    "http://[fe80::1]/v1",
    "http://[fe80::1%25eth0]:8080/v1",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.google.internal./v1",
    "http://metadata/v1",
    "http://instance-data/latest/",
    "http://[fd00:ec2::254]/latest/",
    "http://100.100.100.200/latest/",
    "http://[::ffff:169.254.169.254]/v1",
    "http://2852039166/v1",  # 169.254.169.254 as one number
    "http://0xa9fea9fe/v1",
    "http://0251.0376.0251.0376/v1",
    "http://169.254.43518/v1",
])
def test_link_local_and_metadata_addresses_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_table(Deployment, {"name": "a", "model": "m", "api_base": url}, "litellm.deployments[0]")
    assert "litellm.deployments[0]" in str(info.value) and "api_base points at" in str(info.value)
    assert "allow_link_local = true" in str(info.value)
    d = build_table(Deployment, {"name": "a", "model": "m", "api_base": url, "allow_link_local": True}, "x")
    assert d.api_base == url and d.allow_link_local


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/v1", "http://localhost:11434/v1", "http://[::1]:8000/v1", "http://10.1.2.3/v1",
    "http://192.168.1.20:11434/v1", "http://172.16.0.9/v1", "http://[fd12:3456::1]/v1", "http://100.64.1.1/v1",
    "https://api.openai.com/v1", "https://openrouter.ai/api/v1", "https://xn--bcher-kva.example/v1",
    "https://example.org/openai/deployments/x?api-version=2024-02-01", "http://metadata.example.org/v1",
])
def test_loopback_private_and_public_endpoints_stay_allowed(url: str) -> None:
    assert Deployment("a", "m", api_base=url).api_base == url
    check_url("api_base", url)


def test_link_local_reason_reads_numbers_as_the_resolver_does() -> None:
    assert link_local_reason("169.254.1.1") is not None
    assert link_local_reason("example.org") is None
    assert link_local_reason("10.0.0.1") is None


# -- keys at start-up ---------------------------------------------------------------------------------


class Member:
    def __init__(self, d: Deployment) -> None:
        self.deployment, self.breaker = d, CircuitBreaker()


class KeyedPlugin(ProviderPlugin):
    TABLE = "keyed"
    CONFIG = ProviderConfig
    CIRCUITS_TABLE = "keyed_circuits"
    log = logging.getLogger("ksi_host.provider.keyed")

    def build_pool(self, config: ProviderConfig, host: Any) -> DeploymentPool[Member]:
        return DeploymentPool([Member(d) for d in config.deployments], priority=config.priority)


def keyed(*deployments: tuple[str, str, str | None]) -> dict[str, Any]:
    return {"keyed": {"deployments": [{"name": n, "model": m, **({"api_key_env": k} if k else {})}
                                      for n, m, k in deployments]}}


async def test_an_unset_key_is_a_warning_when_another_deployment_serves_the_model(
    make_host: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KSI_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("KSI_TEST_HAVE_KEY", "sk-test-have")
    config = keyed(("first", "gpt-4o", "KSI_TEST_NO_SUCH_KEY"), ("family", "gpt-*", "KSI_TEST_HAVE_KEY"),
                   ("local", "llama", None))
    with caplog.at_level(logging.WARNING, logger="ksi_host.provider.keyed"):
        async with make_host(KeyedPlugin(), DirectQueue(), config=config):
            pass
    (record,) = [r for r in caplog.records if r.name == "ksi_host.provider.keyed"]
    assert record.levelno == logging.WARNING
    assert "'first'" in record.getMessage() and "KSI_TEST_NO_SUCH_KEY" in record.getMessage()


@pytest.mark.parametrize("deployments", [
    [("only", "gpt-4o", "KSI_TEST_NO_SUCH_KEY")],
    [("a", "gpt-*", "KSI_TEST_NO_SUCH_KEY"), ("b", "gpt-4o", "KSI_TEST_HAVE_KEY")],  # b does not cover gpt-*
    [("a", "gpt-4o", "KSI_TEST_NO_SUCH_KEY"), ("b", "gpt-4o", "KSI_TEST_EMPTY_KEY")],
])
async def test_no_deployment_with_its_key_for_a_model_stops_start_up(
    make_host: Any, monkeypatch: pytest.MonkeyPatch, deployments: list[tuple[str, str, str]]
) -> None:
    monkeypatch.delenv("KSI_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("KSI_TEST_HAVE_KEY", "sk-test-have")
    monkeypatch.setenv("KSI_TEST_EMPTY_KEY", "")
    with pytest.raises(StartupError) as info:
        async with make_host(KeyedPlugin(), DirectQueue(), config=keyed(*deployments)):
            pass
    message = str(info.value)
    assert message.startswith("[keyed] no deployment serving model") and "KSI_TEST_NO_SUCH_KEY" in message
    assert "sk-test-have" not in message


async def test_a_read_only_host_needs_no_key(make_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSI_TEST_NO_SUCH_KEY", raising=False)
    async with make_host(KeyedPlugin(), config=keyed(("only", "m", "KSI_TEST_NO_SUCH_KEY")), serve=False) as host:
        assert [i.name for i in await host.providers("m")] == ["only"]


def test_check_keys_is_quiet_when_every_key_is_there(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("KSI_TEST_HAVE_KEY", "x")
    with caplog.at_level(logging.DEBUG):
        check_keys([Deployment("a", "m", api_key_env="KSI_TEST_HAVE_KEY"), Deployment("b", "m")], table="t",
                   log=logging.getLogger("t"))
    assert caplog.records == []
