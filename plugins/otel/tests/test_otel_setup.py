"""Where spans go: the OTEL_* environment variables, the [otel] table, start-up and shut-down."""

from __future__ import annotations

import importlib.util
import logging
import socket
import time
from typing import Any

import pytest
from conftest import OtlpReceiver
from ksi_otel import setup
from ksi_otel.plugin import Plugin

from ksi_host import ConfigError, StartupError
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from no OTEL_* setting of the machine it runs on."""
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("env", "names"), [
    ({}, ["otlp_proto_http"]),  # the default: OTLP over HTTP/protobuf
    ({"OTEL_TRACES_EXPORTER": ""}, ["otlp_proto_http"]),  # empty means unset
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_http"]),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ["otlp_proto_grpc"]),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, ["otlp_proto_http"]),
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp_proto_http"]),
    ({"OTEL_TRACES_EXPORTER": "none"}, []),
    ({"OTEL_TRACES_EXPORTER": "otlp_proto_grpc"}, ["otlp_proto_grpc"]),
])
def test_the_exporters_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: list[str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert setup.exporter_names() == names


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_TRACES_EXPORTER": "none,console"}, "OTEL_TRACES_EXPORTER='none,console': 'none' cannot be combined"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL='http/json': unsupported OTLP protocol (supported: http/protobuf, grpc)"),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "smoke"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='smoke': unsupported"),
])
def test_a_bad_setting_stops_start_up_naming_it(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StartupError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        setup.exporter_names()


async def test_an_exporter_that_is_not_installed_stops_start_up(make_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json")
    with pytest.raises(StartupError, match=r"no span exporter 'zipkin_json' is installed; installed: .*console.*otlp"):
        async with make_host(DirectQueue(), Plugin(), config={"otel": {}}):
            pass


def test_grpc_is_an_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
        with pytest.raises(StartupError, match=r"no span exporter 'otlp_proto_grpc' is installed \(pip install 'ksi-otel\[grpc\]'\)"):
            setup.tracer_provider(None)
    else:
        provider = setup.tracer_provider(None)
        assert provider is not None
        provider.shutdown()


def test_none_builds_no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert setup.tracer_provider(None) is None


@pytest.mark.parametrize(("env", "configured", "expected"), [
    ({}, None, "ksi-host"),
    ({}, "agents", "agents"),
    ({"OTEL_SERVICE_NAME": "from-env"}, "agents", "from-env"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,deployment.environment=test"}, "agents", "from-attrs"),
])
def test_the_service_name(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], configured: str | None, expected: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert setup.resource(configured).attributes["service.name"] == expected


@pytest.mark.parametrize(("table", "message"), [
    ({"service_name": ""}, "config table otel: service_name must be a non-empty string or absent"),
    ({"record_content": "yes"}, "config key otel.record_content: expected true or false, got 'yes'"),
    ({"exporter": "otlp"}, "config key otel.exporter: unknown key (known keys of otel: enabled, record_content, service_name)"),
])
async def test_the_config_table_is_checked(make_host: Any, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        async with make_host(Plugin(), config={"otel": table}):
            pass
    assert str(e.value).startswith(message)


async def test_sdk_disabled_and_read_only_hosts_write_nothing(make_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = Plugin()
    async with make_host(DirectQueue(), plugin, config={"otel": {}}, serve=False):
        assert not plugin.active  # ksi-host status, usage: nothing runs, nothing is traced
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    plugin = Plugin()
    async with make_host(DirectQueue(), plugin, config={"otel": {}}):
        assert not plugin.active
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    plugin = Plugin()
    async with make_host(DirectQueue(), plugin, config={"otel": {}}):
        assert plugin.active


async def test_the_default_exporter_sends_otlp_over_http_and_shut_down_flushes(
        make_host: Any, otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # only a flush sends the batch before a minute
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("oa-main")), Plugin(),
                         config={"otel": {"service_name": "agents"}}) as host:
        assert (await host.complete({"model": "gpt-test", "prompt": "hi", "session_id": "s1"})).ok
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 10
    received = otlp_receiver.spans()
    assert sorted(span.name for _, span in received) == ["chat gpt-test", "ksi.request gpt-test"]
    resource = {a.key: a.value.string_value for a in received[0][0].attributes}
    assert resource["service.name"] == "agents"
    chat = next(span for _, span in received if span.name == "chat gpt-test")
    attributes = {a.key: a.value for a in chat.attributes}
    assert attributes["gen_ai.provider.name"].string_value == "oa-main"
    assert attributes["gen_ai.conversation.id"].string_value == "s1"
    assert attributes["gen_ai.usage.input_tokens"].int_value == 10


async def test_an_injected_provider_is_flushed_at_shut_down_not_shut_down(make_host: Any, otlp_receiver: OtlpReceiver) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_receiver.url + "/v1/traces"),
                                                   schedule_delay_millis=60_000))
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a")), Plugin(tracer_provider=provider),
                         config={"otel": {}}) as host:
        assert (await host.complete({"model": "m", "prompt": "hi"})).ok
    assert len(otlp_receiver.spans()) == 2  # flushed at shut-down
    tracer = provider.get_tracer("still-open")
    tracer.start_span("after").end()  # the provider is its owner's, still working
    assert provider.force_flush(5000)
    assert len(otlp_receiver.spans()) == 3
    provider.shutdown()


async def test_an_unreachable_collector_is_logged_never_raised(make_host: Any, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("a")), Plugin(), config={"otel": {}}) as host:
        result = await host.complete({"model": "m", "prompt": "hi"})
    assert result.ok
    assert time.monotonic() - t0 < 15
    assert any(r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING for r in caplog.records), caplog.text
