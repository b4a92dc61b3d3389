"""The ``otel`` plugin: OpenTelemetry spans of every request and attempt, from the host's observer hooks.

It collects each request's attempts as ``ksi_attempt_finished`` reports them
and writes the request's spans when ``ksi_request_finished`` reports its result
(:mod:`ksi_otel.spans`). The SDK is imported at start-up only (this module
imports none of it: ``ksi-host plugins`` loads this module), and not at all
when ``[otel] enabled = false``, when ``OTEL_SDK_DISABLED=true`` or for
read-only commands (``ksi-host status``, ``usage``: ``host.serve`` is false).
With ``OTEL_TRACES_EXPORTER=none`` no span is built (nothing would receive it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ksi_host import Attempt, CompletionRequest, CompletionResult, OperationalError, UpstreamCall, hookimpl

from .config import OtelConfig

TABLE = "otel"
FLUSH_TIMEOUT_MS = 10_000
"""How long shut-down waits for the batch processors to export the last spans (a collector that is down must not
hold ksi-host for long; the OTLP exporter gives up on its own after ``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s)."""
REMEMBERED_CANCELS = 1024
"""How many cancelled requests' spans are kept for attempts reported after the cancel (the attempt that was cut short)."""

log = logging.getLogger("ksi_otel")


class Plugin:
    """Writes spans of finished requests. ``tracer_provider``: use this provider (tests: an in-memory
    exporter) instead of one configured from the ``OTEL_*`` environment variables; it is not shut
    down by the plugin (its owner does that), only flushed."""

    def __init__(self, tracer_provider: Any = None) -> None:
        self._injected = tracer_provider
        self._provider: Any = None  # the provider spans go to while the host runs
        self._writer: Any = None  # a ksi_otel.spans.SpanWriter, None when switched off
        self._pending: dict[str, list[tuple[Attempt, UpstreamCall | None, int]]] = {}
        self._cancelled: dict[str, Any] = {}  # request id -> its request span, for an attempt reported late

    @property
    def active(self) -> bool:
        """Are spans being written (the host runs, and neither config nor OTEL_SDK_DISABLED switched them off)?"""
        return self._writer is not None

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, OtelConfig

    @hookimpl
    def ksi_startup(self, host: Any) -> None:
        config: OtelConfig = host.config[TABLE]
        if not config.enabled or not host.serve:
            return
        from . import setup

        if self._injected is not None:
            self._provider = self._injected
        elif setup.disabled():
            return
        else:
            self._provider = setup.tracer_provider(config.service_name)
            if self._provider is None:
                log.info("ksi-otel: OTEL_TRACES_EXPORTER=none: no spans are built")
                return
        from . import __version__
        from .spans import SpanWriter

        self._writer = SpanWriter(self._provider.get_tracer("ksi_otel", __version__), config.record_content)

    @hookimpl
    def ksi_attempt_finished(self, request: CompletionRequest, attempt: Attempt, error: OperationalError | None,
                             call: UpstreamCall | None) -> None:
        if self._writer is None:
            return
        reported_at = time.time_ns() if call is None else 0  # (the time of an attempt that made a call is the call's)
        late = self._cancelled.pop(request.request_id, None) if self._cancelled else None
        if late is not None:
            self._writer.late_attempt(late, request, attempt, call)
            return
        found = self._pending.get(request.request_id)
        if found is None:
            self._pending[request.request_id] = [(attempt, call, reported_at)]
        else:
            found.append((attempt, call, reported_at))

    @hookimpl
    def ksi_request_finished(self, request: CompletionRequest, result: CompletionResult) -> None:
        if self._writer is None:
            return
        span = self._writer.request(request, result, self._pending.pop(request.request_id, ()))
        if result.status == "cancelled":  # an attempt cut short by the cancel may still be reported
            self._cancelled[request.request_id] = span
            if len(self._cancelled) > REMEMBERED_CANCELS:
                del self._cancelled[next(iter(self._cancelled))]

    @hookimpl
    async def ksi_shutdown(self) -> None:
        provider, self._writer, self._provider = self._provider, None, None
        self._pending.clear()
        self._cancelled.clear()
        if provider is None:
            return
        # the batch processors export from their own threads: wait for them off the event loop
        flushed = await asyncio.to_thread(provider.force_flush, FLUSH_TIMEOUT_MS)
        if not flushed:
            log.warning("ksi-otel: not every span was exported within %d s at shut-down", FLUSH_TIMEOUT_MS // 1000)
        if provider is not self._injected:
            await asyncio.to_thread(provider.shutdown)
