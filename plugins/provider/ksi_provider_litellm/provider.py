"""One deployment, ready to call through litellm: :class:`LitellmProvider`.

``complete`` makes exactly one upstream attempt: litellm's own retries
(``num_retries=0``) and the OpenAI SDK client's (``max_retries=0``) are off;
the retry plugin owns retries. Failures become :mod:`ksi_host.errors` errors
(:func:`map_exception`); the deployment's circuit records every outcome.

litellm is imported on the first call (in a worker thread, so the event loop
keeps running during its seconds-long import), never at plugin load.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ksi_host import CompletionRequest, ProviderError, ProviderResponse, Usage
from ksi_host.providers import (
    CircuitBreaker,
    DeploymentProvider,
    connection_error,
    context_window_error,
    error_detail,
    error_for_status,
    malformed_response,
    timeout_error,
)

from .config import LitellmDeployment

log = logging.getLogger("ksi_host.provider.litellm")

TIMEOUT_GRACE_S = 0.5
"""How long past the attempt's timeout the provider waits for litellm's own timeout before giving up itself."""

_litellm: Any = None
_import: tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]] | None = None


LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router")


def _import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # litellm gives its loggers a handler of its own that writes every record below WARNING to stdout,
    # where `ksi-host run` writes its results (--out -, the default): with -v its debug lines got into
    # the results. Its import logs through that handler (kept to warnings here); then the handler goes,
    # and its records reach the application's handlers like any library's (ksi-host -v: stderr).
    loggers = [logging.getLogger(name) for name in LITELLM_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        import litellm
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
            for handler in list(logger.handlers):
                if type(handler).__module__.startswith("litellm"):
                    logger.removeHandler(handler)
    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
    _warm_up(litellm)
    return litellm


def _warm_up(litellm: Any) -> None:
    """Run litellm's first-call set-up now, in the import's worker thread.

    litellm's first completion in a process imports more modules and builds
    pydantic schemas (~0.5 s of CPU, seconds on a loaded machine), on the event
    loop and inside the first attempt's timeout: first calls timed out *after*
    the upstream had answered them, so they were sent twice (and billed twice,
    recorded once). One offline ``mock_response`` completion here does that work
    where the import promises to (off the loop, outside every timeout).
    """
    try:
        litellm.completion(model="openai/ksi-warm-up", messages=[{"role": "user", "content": "warm-up"}],
                           mock_response="warm-up", num_retries=0)
    except Exception as e:  # the first real call just stays slower; say so
        log.warning("litellm warm-up failed (the first call will be slower): %s: %s", type(e).__name__, e)


async def load_litellm() -> Any:
    """The litellm module, imported once in a worker thread (concurrent first callers share the import)."""
    global _litellm, _import
    if _litellm is not None:
        return _litellm
    loop = asyncio.get_running_loop()
    if _import is None or _import[0] is not loop:
        _import = (loop, asyncio.ensure_future(asyncio.to_thread(_import_litellm)))
    pending = _import
    try:
        _litellm = await asyncio.shield(pending[1])
    except Exception:
        if _import is pending:  # a failed import is tried again by the next call
            _import = None
        raise
    return _litellm


def map_exception(exc: BaseException, lit: Any, *, provider: str, timeout_s: float | None,
                  secrets: tuple[str | None, ...] = ()) -> ProviderError | None:
    """The ksi_host error for an exception litellm raised, or None if it is not an upstream failure.

    Timeouts -> ProviderTimeout; context length -> ContextWindowExceeded;
    connection errors -> ProviderUnavailable; everything else by its HTTP
    status (429 RateLimited with Retry-After, 401/403 AuthFailed, 400
    BadRequest, 5xx ProviderUnavailable). Exceptions that are not litellm's /
    the OpenAI SDK's API errors are programming errors: None (re-raise them).
    """
    import openai  # litellm imported it already: cheap

    if not isinstance(exc, openai.OpenAIError):
        return None
    ex = lit.exceptions
    response = getattr(exc, "response", None)
    headers = getattr(exc, "litellm_response_headers", None) or getattr(response, "headers", None) or getattr(exc, "headers", None)
    body: Any = None
    if response is not None:
        import httpx  # litellm imported it already: cheap

        try:
            body = response.text
        except (httpx.ResponseNotRead, AttributeError):  # a streamed body, or no body: use the exception's message
            body = None
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, (ex.Timeout, openai.APITimeoutError)):
        return timeout_error(provider, timeout_s, secrets=secrets)
    found, _ = error_detail(body)
    detail = found or _short(message)
    if isinstance(exc, ex.ContextWindowExceededError):
        return context_window_error(provider, detail, secrets=secrets)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.APIConnectionError) and not isinstance(status, int):
        return connection_error(provider, detail, secrets=secrets)
    if isinstance(status, int):
        return error_for_status(status, headers=headers, body=body, message=None if found else detail,
                                provider=provider, secrets=secrets)
    return None


def _short(message: str) -> str:
    # litellm prefixes messages with its class names ("litellm.RateLimitError: RateLimitError: OpenAIException - ...").
    return message.rsplit(" - ", 1)[-1].strip() if " - " in message else message


def last_user_text(request: CompletionRequest) -> str:
    for m in reversed(request.messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    return ""


class LitellmProvider(DeploymentProvider):
    """A configured deployment: :class:`~ksi_host.providers.DeploymentProvider` (the key, the
    circuit, the outcome) around one ``litellm.acompletion``."""

    log = log

    def __init__(self, deployment: LitellmDeployment, breaker: CircuitBreaker, *, mock: bool = False) -> None:
        super().__init__(deployment, breaker)
        self.mock = mock
        lm = deployment.litellm_model
        self._fixed_model = lm if lm is not None and "{model}" not in lm else None
        # Built once; each call copies it and adds the request's own values.
        base: dict[str, Any] = {"num_retries": 0, "max_retries": 0}
        if deployment.api_base is not None:
            base["api_base"] = deployment.api_base
        if mock:
            base["custom_llm_provider"] = "openai"
        self._base = base

    def _kwargs(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> dict[str, Any]:
        kw = self._base.copy()
        kw["model"] = self._fixed_model or self.deployment.upstream_model(request.model)
        kw["messages"] = [dict(m) for m in request.messages]
        if timeout_s is not None:
            kw["timeout"] = timeout_s
        if key is not None:
            kw["api_key"] = key
        if request.max_tokens is not None:
            kw["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            kw["temperature"] = request.temperature
        if self.mock:
            kw["mock_response"] = f"mock response to: {last_user_text(request)[:200]}"
        return kw

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One ``litellm.acompletion``; litellm's errors mapped (:func:`map_exception`)."""
        lit = _litellm or await load_litellm()
        kwargs = self._kwargs(request, timeout_s, key)
        try:
            if timeout_s is None:
                response = await lit.acompletion(**kwargs)
            else:  # litellm's own timeout should fire first; this one is the backstop
                async with asyncio.timeout(timeout_s + TIMEOUT_GRACE_S):
                    response = await lit.acompletion(**kwargs)
        except TimeoutError:
            raise
        except Exception as e:
            mapped = map_exception(e, lit, provider=self.name, timeout_s=timeout_s, secrets=(key,))
            if mapped is None:
                raise
            raise mapped from None
        return self._response(lit, response, request)

    def _response(self, lit: Any, response: Any, request: CompletionRequest) -> ProviderResponse:
        choices = getattr(response, "choices", None)
        if not choices:
            raise malformed_response(self.name, "the answer has no choices")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if text is None:
            text = ""
        elif not isinstance(text, str):
            raise malformed_response(self.name, f"the answer's content is {type(text).__name__}, not text")
        usage = None
        u = getattr(response, "usage", None)
        if u is not None:
            prompt = int(getattr(u, "prompt_tokens", 0) or 0)
            completion = int(getattr(u, "completion_tokens", 0) or 0)
            total = int(getattr(u, "total_tokens", 0) or 0) or prompt + completion
            usage = Usage(prompt, completion, total, self._cost(lit, response))
        return ProviderResponse(text, usage=usage, model=getattr(response, "model", None), session_id=request.session_id)

    @staticmethod
    def _cost(lit: Any, response: Any) -> float | None:
        hidden = getattr(response, "_hidden_params", None) or {}
        if "response_cost" in hidden:  # litellm priced it already (None: a model its cost map does not know)
            cost = hidden["response_cost"]
        else:
            try:
                cost = lit.completion_cost(completion_response=response)
            except lit.exceptions.ModelNotMappedError:
                return None
        return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None


__all__ = ["LitellmProvider", "load_litellm", "map_exception"]
