"""The tracer provider of a running host, configured as the OpenTelemetry SDK configures itself.

Imported only at start-up (never by ``ksi-host --help`` or ``ksi-host plugins``),
and an exporter's module only when that exporter is selected: the OTLP/HTTP
exporter costs about 0.1 s of imports, the SDK about 0.1 s more (see the README).

The environment variables read, with the SDK's meaning:

* ``OTEL_SDK_DISABLED=true``: no provider at all (nothing is recorded).
* ``OTEL_TRACES_EXPORTER``: comma-separated exporter names, default ``otlp``;
  ``none`` exports nothing, and then no span is built at all (the plugin's
  provider is its own: nothing else could receive them); ``console`` prints
  each span as JSON on stdout. Any other name is looked up in the entry point group
  ``opentelemetry_traces_exporter``, as the SDK does (``zipkin_json``, ...).
* ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``:
  which OTLP exporter ``otlp`` is: ``http/protobuf`` (the default, as the
  OpenTelemetry specification has it; the Python SDK's own default is ``grpc``)
  or ``grpc`` (``pip install 'ksi-otel[grpc]'``).
* Everything else (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._HEADERS``,
  ``..._TIMEOUT``, ``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER``, ...) is read by the SDK and the exporter themselves.

``service.name`` is ``OTEL_SERVICE_NAME`` (or ``service.name`` in
``OTEL_RESOURCE_ATTRIBUTES``), else ``[otel] service_name``, else ``ksi-host``.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import Any

from ksi_host import StartupError

EXPORTER_GROUP = "opentelemetry_traces_exporter"
PROTOCOLS = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
INSTALL = {"otlp_proto_http": "ksi-otel", "otlp_proto_grpc": "'ksi-otel[grpc]'"}


def disabled() -> bool:
    """``OTEL_SDK_DISABLED=true``: the SDK is switched off for this process."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def exporter_names() -> list[str]:
    """The entry point names of the selected exporters (``OTEL_TRACES_EXPORTER``, default ``otlp``)."""
    value = os.environ.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"  # empty means unset, as in the spec
    names = [n.strip() for n in value.split(",") if n.strip()]
    if "none" in names:
        if len(names) > 1:
            raise StartupError(f"OTEL_TRACES_EXPORTER={value!r}: 'none' cannot be combined with other exporters")
        return []
    return [_otlp(n) if n in ("otlp", *PROTOCOLS.values()) else n for n in names]


def _otlp(name: str) -> str:
    if name != "otlp":  # otlp_proto_http / otlp_proto_grpc named outright
        return name
    var = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    protocol = os.environ.get(var, "").strip()
    if not protocol:
        var = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = os.environ.get(var, "").strip()
    if not protocol:
        return PROTOCOLS["http/protobuf"]
    if protocol not in PROTOCOLS:
        raise StartupError(f"{var}={protocol!r}: unsupported OTLP protocol (supported: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[protocol]


def load_exporter(name: str) -> Any:
    """A new span exporter of the entry point ``name`` (its module imported now)."""
    found = entry_points(group=EXPORTER_GROUP, name=name)
    if not found:
        known = sorted({ep.name for ep in entry_points(group=EXPORTER_GROUP)} | {"otlp", "none"})
        hint = f" (pip install {INSTALL[name]})" if name in INSTALL else ""
        raise StartupError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed{hint}; "
                           f"installed: {', '.join(known)}")
    ep = next(iter(found))
    try:
        return ep.load()()
    except Exception as e:  # a bad endpoint, header or certificate setting: the exporter's own message
        raise StartupError(f"OTEL_TRACES_EXPORTER: the {name!r} span exporter could not be set up: "
                           f"{type(e).__name__}: {e}") from e


def resource(service_name: str | None) -> Any:
    """The process's resource: the SDK's detectors, ``service.name`` as the module docstring says."""
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource

    from .config import DEFAULT_SERVICE_NAME

    from_env = OTELResourceDetector().detect().attributes.get(SERVICE_NAME)
    return Resource.create({SERVICE_NAME: from_env or service_name or DEFAULT_SERVICE_NAME})


def tracer_provider(service_name: str | None) -> Any:
    """A new SDK tracer provider with one batch span processor per selected exporter; None for ``none``."""
    exporters = [load_exporter(name) for name in exporter_names()]  # a bad setting stops start-up before anything runs
    if not exporters:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=resource(service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
