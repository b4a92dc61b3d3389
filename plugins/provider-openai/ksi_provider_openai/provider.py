"""One deployment, ready to call: :class:`OpenAIProvider`.

``complete`` makes exactly one ``POST {api_base}/chat/completions`` over the
plugin's pooled client and maps the outcome with :mod:`ksi_host.providers.errormap`:

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
=====================================  =========================================

The deployment's circuit records every outcome (:meth:`CircuitBreaker.record_error`:
a BadRequest is the request's fault and does not count against the deployment).
The API key is read from ``api_key_env`` at call time, sent only in the
``Authorization`` header and removed from every error message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ksi_host import CompletionRequest, ProviderResponse, Usage
from ksi_host.providers import CircuitBreaker, DeploymentProvider, connection_error, error_for_status, malformed_response

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
        up = deployment.upstream_model
        self._fixed_model = up if up is not None and "{model}" not in up else None
        self.calls = 0  # upstream attempts made (for status and tests)

    def body(self, request: CompletionRequest) -> dict[str, Any]:
        """The JSON body of the chat completion request."""
        body: dict[str, Any] = {
            "model": self._fixed_model or self.deployment.model_for(request.model),
            "messages": request.messages,  # a tuple of dicts: encoded as a JSON array
        }
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One ``POST {api_base}/chat/completions``; HTTP statuses and connection failures mapped."""
        headers = self._headers if key is None else {**self._headers, "Authorization": f"Bearer {key}"}
        data = _dumps(self.body(request)).encode()
        session = await self.client.session()
        http = _client.aiohttp
        self.calls += 1
        try:
            async with asyncio.timeout(timeout_s):
                async with session.post(self.url, data=data, headers=headers) as resp:
                    status = resp.status
                    raw = await resp.read()
                    if status >= 300:
                        raise error_for_status(status, headers=resp.headers, body=raw, provider=self.name, secrets=(key,))
        except http.ClientError as e:
            raise connection_error(self.name, f"{type(e).__name__}: {e}", secrets=(key,)) from None
        return self._response(raw, status, request)

    def _response(self, raw: bytes, status: int, request: CompletionRequest) -> ProviderResponse:
        try:
            payload = _loads(raw)
        except ValueError:
            raise malformed_response(self.name, f"the body is not JSON ({len(raw)} bytes)") from None
        if not isinstance(payload, dict):
            raise malformed_response(self.name, f"the body is a JSON {type(payload).__name__}, not an object")
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            if "error" in payload:  # an error reported at a success status (some gateways do)
                raise error_for_status(status, body=payload, provider=self.name)
            raise malformed_response(self.name, "the answer has no choices")
        message = choices[0].get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if text is None:
            text = ""
        elif not isinstance(text, str):
            raise malformed_response(self.name, f"the answer's content is {type(text).__name__}, not text")
        usage = None
        u = payload.get("usage")
        if isinstance(u, dict):
            prompt = _int(u.get("prompt_tokens"))
            completion = _int(u.get("completion_tokens"))
            total = _int(u.get("total_tokens")) or prompt + completion
            usage = Usage(prompt, completion, total, self.deployment.cost(prompt, completion))
        model = payload.get("model")
        return ProviderResponse(text, usage=usage, model=model if isinstance(model, str) else None,
                                session_id=request.session_id)


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


__all__ = ["OpenAIProvider"]
