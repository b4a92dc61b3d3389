"""A tiny provider plugin on the public provider kit, for running the conformance suite with no real plugin.

It speaks HTTP/1.1 itself over asyncio streams (the host has no HTTP client; one connection a call,
``Connection: close``) to an OpenAI-compatible ``/chat/completions``; the kit does the rest: the body
(:func:`~ksi_host.providers.request_body`), the answers (:func:`~ksi_host.providers.response_of`,
:func:`~ksi_host.providers.delta_of`, :func:`~ksi_host.providers.sse_data`), the error mapping, the key,
the timeouts and the circuits. Its table is ``[tiny]``; a deployment may set ``upstream_model``.
``tests/test_readme.py`` copies this file as ``my_provider.py`` into an outside project.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import attrs

from ksi_host import CompletionRequest, ProviderResponse
from ksi_host.providers import (
    CircuitBreaker,
    Deployment,
    DeploymentPool,
    DeploymentProvider,
    ProviderConfig,
    ProviderPlugin,
    connection_error,
    delta_of,
    deployments_field,
    error_for_status,
    malformed_response,
    request_body,
    response_of,
    sse_data,
)
from ksi_host.providers.validators import opt_str


@attrs.define(frozen=True)
class TinyDeployment(Deployment):
    upstream_model: str | None = attrs.field(default=None, validator=opt_str)


@attrs.define(frozen=True)
class TinyConfig(ProviderConfig):
    deployments: list[TinyDeployment] = deployments_field()


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's bytes as they come (chunked, or to the end of the connection)."""
    if headers.get("transfer-encoding") != "chunked":
        yield await reader.read()
        return
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        yield await reader.readexactly(size)
        await reader.readexactly(2)


def _json(raw: bytes | str, provider: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise malformed_response(provider, f"not JSON ({len(raw)} bytes)") from None


class TinyProvider(DeploymentProvider):
    log = logging.getLogger("tests.tiny_provider")

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        async with asyncio.timeout(timeout_s):
            [answer] = [a async for a in self._call(request, key, stream=False)]
        return answer

    def attempt_stream(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> AsyncIterator[Any]:
        return self._call(request, key, stream=True)

    async def _call(self, request: CompletionRequest, key: str | None, *, stream: bool) -> AsyncIterator[Any]:
        """One POST: the whole answer (one item), or each streamed delta as its event comes."""
        body = json.dumps(request_body(request, self.deployment.upstream_model or request.model, stream=stream,
                                       provider=self.name)).encode()
        url = urlsplit(self.deployment.api_base)
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            try:  # leaving early (a timeout, the consumer gone) closes the connection: the upstream sees it
                writer.write(f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n{auth}Content-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").strip().split("\r\n")
                status = int(status_line.split()[1])
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
                if status >= 300 or not stream:
                    raw = b"".join([piece async for piece in _body(reader, headers)])
                    if status >= 300:
                        raise error_for_status(status, headers=headers, body=raw, provider=self.name, secrets=(key,))
                    yield response_of(_json(raw, self.name), provider=self.name, status=status, session_id=request.session_id)
                    return
                async for event in sse_data(_body(reader, headers)):
                    delta = None if event == "[DONE]" else delta_of(_json(event, self.name), provider=self.name)
                    if delta is not None:
                        yield delta
            finally:
                writer.close()
        except (OSError, asyncio.IncompleteReadError) as e:
            raise connection_error(self.name, type(e).__name__, secrets=(key,)) from None


class Plugin(ProviderPlugin):
    TABLE = "tiny"
    CONFIG = TinyConfig
    CIRCUITS_TABLE = "tiny_circuits"
    log = TinyProvider.log

    def build_pool(self, config: TinyConfig, host: Any) -> DeploymentPool[TinyProvider]:
        return DeploymentPool([TinyProvider(d, CircuitBreaker.from_config(config.circuit, clock=host.clock))
                               for d in config.deployments], priority=config.priority)
