"""Fixtures of the ksi-otel tests: an in-memory span exporter, a host with the plugin, a local OTLP receiver."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ksi_otel.plugin import Plugin
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ksi_host import Host
from ksi_host.testing import DirectQueue


class Spans:
    """What the in-memory exporter received, by name."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name.startswith(prefix)]

    def request(self) -> ReadableSpan:
        (span,) = self.named("ksi.request ")
        return span

    def attempts(self) -> list[ReadableSpan]:
        return sorted(self.named("chat "), key=lambda s: s.attributes["ksi.attempt"])


@pytest.fixture
def spans() -> Iterator[Spans]:
    s = Spans()
    yield s
    s.provider.shutdown()


@pytest.fixture
def otel_host(make_host: Callable[..., Host], spans: Spans) -> Callable[..., Host]:
    """``otel_host(*plugins, otel={...})``: a host with DirectQueue, ``plugins`` and ksi-otel writing to ``spans``."""

    def factory(*plugins: Any, otel: dict[str, Any] | None = None, **kw: Any) -> Host:
        return make_host(DirectQueue(), *plugins, Plugin(tracer_provider=spans.provider), config={"otel": otel or {}}, **kw)

    return factory


# -- subprocesses: in-test plugins installed as a fake distribution ---------------------------------

FAKE_PLUGINS = '''
from ksi_host import ProviderResponse, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

class Queue(DirectQueue):
    pass

async def _answer(request):
    return ProviderResponse(text="echo: " + request.messages[-1]["content"], usage=Usage(3, 2, 5, 0.001),
                            finish_reason="stop")

class Providers(ScriptedProviders):
    def __init__(self):
        super().__init__(FakeProvider("echo-main", model="echo*", script=[_answer]))
'''


@pytest.fixture
def fake_site(tmp_path: Path) -> Path:
    """A folder holding a fake distribution ``ksi-fake-otel`` with the plugins ``fakequeue`` and ``echo``."""
    where = tmp_path / "site"
    where.mkdir()
    (where / "ksi_fake_otel_plugins.py").write_text(textwrap.dedent(FAKE_PLUGINS))
    info = where / "ksi_fake_otel-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ksi-fake-otel\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ksi_host]\nfakequeue = ksi_fake_otel_plugins:Queue\n"
                                           "echo = ksi_fake_otel_plugins:Providers\n")
    return where


def clean_env(site: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment without OTEL_* and KSI_HOST_* settings (plus ``extra``), ``site`` on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "KSI_HOST_"))}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_python(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


class OtlpReceiver:
    """A local OTLP/HTTP trace receiver on 127.0.0.1: keeps every ``POST /v1/traces`` body, answers 200."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                length = int(self.headers.get("Content-Length") or 0)
                if self.path == "/v1/traces":
                    bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[Any]:
        """Every span received, decoded (opentelemetry.proto Span messages)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        found = []
        for body in self.bodies:
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            for rs in message.resource_spans:
                for ss in rs.scope_spans:
                    found += [(rs.resource, span) for span in ss.spans]
        return found


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
