"""One deployment, ready to call: :class:`OpenAIProvider`.

``complete`` makes exactly one ``POST {api_base}/chat/completions`` over the
plugin's pooled client; ``stream`` makes the same request with ``"stream": true``
(and ``stream_options.include_usage``) and hands out each server-sent event's
chunk as it arrives. The body holds every chat parameter the request sets and
its ``provider_options``, as they are (:func:`ksi_host.providers.request_body`);
the answer's text, tool calls, finish reason, refusal, model and usage (cached
and reasoning tokens too) are read with :mod:`ksi_host.providers.openai_wire`.
The outcome is mapped with :mod:`ksi_host.providers.errormap`:

=====================================  =========================================
what happened                          error raised
=====================================  =========================================
no answer within the attempt timeout   ProviderTimeout
connection refused/reset/closed        ProviderUnavailable (``connection failed``)
HTTP 429                               RateLimited (``retry_after`` from the headers)
HTTP 401/403, key variable unset       AuthFailed
HTTP 400 about context length          ContextWindowExceeded
other HTTP 4xx                         BadRequest
HTTP 5xx                               ProviderUnavailable
HTTP 2xx that is not a completion      ProviderUnavailable (``malformed response``)
a stream cut before its finish_reason  ProviderUnavailable
no next piece of a stream in time      ProviderTimeout
=====================================  =========================================

A stream is complete at its ``data: [DONE]`` (or at the end of the body, after a
chunk with a ``finish_reason``). Closing it early (the consumer left, a timeout)
closes its connection rather than returning it to the pool: the upstream sees
the client go and stops generating.

The deployment's circuit records every outcome (:meth:`CircuitBreaker.record_error`:
a BadRequest is the request's fault and does not count against the deployment).
The API key is read from ``api_key_env`` at call time, sent only in the
``Authorization`` header and removed from every error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ksi_host import ChatDelta, CompletionRequest, ProviderResponse
from ksi_host.providers import (
    CircuitBreaker,
    DeploymentProvider,
    connection_error,
    delta_of,
    deltas_of,
    error_for_status,
    malformed_response,
    request_body,
    response_of,
    sse_data,
)

from . import client as _client
from .client import HttpClient
from .config import OpenAIDeployment

log = logging.getLogger("ksi_host.provider.openai")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


class OpenAIProvider(DeploymentProvider):
    """A configured deployment: :class:`~ksi_host.providers.DeploymentProvider` (the key, the
    circuit, the outcome) around one HTTP request."""

    log = log

    def __init__(self, deployment: OpenAIDeployment, breaker: CircuitBreaker, client: HttpClient) -> None:
        super().__init__(deployment, breaker)
        self.client = client
        self.url = deployment.url
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **deployment.headers}
        self._stream_headers = {**self._headers, "Accept": "text/event-stream"}
        up = deployment.upstream_model
        self._fixed_model = up if up is not None and "{model}" not in up else None
        self.calls = 0  # upstream attempts made (for status and tests)

    def body(self, request: CompletionRequest, *, stream: bool = False) -> dict[str, Any]:
        """The JSON body of the chat completion request (:func:`ksi_host.providers.request_body`)."""
        return request_body(request, self._fixed_model or self.deployment.model_for(request.model), stream=stream,
                            provider=self.name)

    def _send_headers(self, key: str | None, *, stream: bool = False) -> dict[str, str]:
        headers = self._stream_headers if stream else self._headers
        return headers if key is None else {**headers, "Authorization": f"Bearer {key}"}

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One ``POST {api_base}/chat/completions``; HTTP statuses and connection failures mapped."""
        data = _dumps(self.body(request)).encode()
        session = await self.client.session()
        http = _client.aiohttp
        self.calls += 1
        try:
            async with asyncio.timeout(timeout_s):
                async with session.post(self.url, data=data, headers=self._send_headers(key)) as resp:
                    status = resp.status
                    raw = await resp.read()
                    if status >= 300:
                        raise error_for_status(status, headers=resp.headers, body=raw, provider=self.name, secrets=(key,))
        except http.ClientError as e:
            raise connection_error(self.name, f"{type(e).__name__}: {e}", secrets=(key,)) from None
        return self._response(raw, status, request)

    async def prepare(self) -> None:
        """The pooled client (aiohttp's import on the first call) is opened outside the first piece's timeout."""
        await self.client.session()

    async def attempt_stream(self, request: CompletionRequest, timeout_s: float | None,
                             key: str | None) -> AsyncIterator[ChatDelta]:
        """The same request with ``"stream": true``: each chunk's delta as its event arrives. The kit
        (:meth:`DeploymentProvider.stream`) bounds the wait for each piece and calls a stream that ends
        without a finish_reason a cut."""
        data = _dumps(self.body(request, stream=True)).encode()
        session = await self.client.session()
        http = _client.aiohttp
        self.calls += 1
        try:
            # Leaving this block before the body's end (the consumer left, a timeout, a cut) closes the connection:
            # aiohttp does not pool a connection whose body was not read to its end; the upstream sees the client go.
            async with session.post(self.url, data=data, headers=self._send_headers(key, stream=True)) as resp:
                if resp.status >= 300:
                    raise error_for_status(resp.status, headers=resp.headers, body=await resp.read(),
                                           provider=self.name, secrets=(key,))
                if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    # an endpoint that ignored "stream": the whole answer at once, as one piece
                    yield deltas_of(self._response(await resp.read(), resp.status, request))
                    return
                async for event in sse_data(resp.content.iter_any()):
                    if event == "[DONE]":
                        continue  # read on to the body's end: the connection goes back to the pool
                    try:
                        chunk = _loads(event)
                    except ValueError:
                        raise malformed_response(self.name, f"a stream event is not JSON ({len(event)} bytes)") from None
                    delta = delta_of(chunk, provider=self.name, cost=self.deployment.cost)
                    if delta is not None:
                        yield delta
        except http.ClientError as e:
            raise connection_error(self.name, f"{type(e).__name__}: {e}", secrets=(key,)) from None

    def _response(self, raw: bytes, status: int, request: CompletionRequest) -> ProviderResponse:
        try:
            payload = _loads(raw)
        except ValueError:
            raise malformed_response(self.name, f"the body is not JSON ({len(raw)} bytes)") from None
        return response_of(payload, provider=self.name, status=status, cost=self.deployment.cost,
                           session_id=request.session_id)


__all__ = ["OpenAIProvider"]
