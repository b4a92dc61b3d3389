"""One deployment, ready to call through litellm: :class:`LitellmProvider`.

``complete`` makes exactly one upstream attempt: litellm's own retries
(``num_retries=0``) and the OpenAI SDK client's (``max_retries=0``) are off;
the retry plugin owns retries. ``stream`` makes the same one call with
``stream=True`` and ``stream_options={"include_usage": True}`` and hands out
litellm's chunks as :class:`~ksi_host.ChatDelta` pieces. Failures become
:mod:`ksi_host.errors` errors (:func:`map_exception`); the deployment's circuit
records every outcome.

What is sent: every chat parameter the request sets, as ``acompletion``
keyword arguments under their OpenAI names (litellm translates them for
providers that are not OpenAI-compatible, and refuses what a provider cannot
take: BadRequest, nothing sent; ``drop_params`` stays off). For an
OpenAI-compatible endpoint (``openai/...``, ``hosted_vllm/...``, any provider
litellm lists as OpenAI-compatible), the parameters litellm does not know for
that model go through unchanged (``allowed_openai_params``). The request's
``provider_options`` go as ``extra_body``: merged into the upstream JSON body
as they are, never into litellm's own arguments (a request cannot change the
``api_base``, the key or the retries).

litellm is imported on the first call (in a worker thread, so the event loop
keeps running during its seconds-long import), never at plugin load.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import attrs

from ksi_host import BadRequest, ChatDelta, CompletionRequest, ProviderError, ProviderResponse
from ksi_host.providers import (
    CircuitBreaker,
    DeploymentProvider,
    check_options,
    connection_error,
    context_window_error,
    delta_of,
    error_detail,
    error_for_status,
    malformed_response,
    response_of,
    timeout_error,
)

from . import mock
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
                  secrets: tuple[str | None, ...] = (), api_base: str | None = None) -> ProviderError | None:
    """The ksi_host error for an exception litellm raised, or None if it is not an upstream failure.

    Timeouts -> ProviderTimeout; failures with no answer (connection refused,
    a name that does not resolve, a connection closed or reset) ->
    ProviderUnavailable "connection failed", naming ``api_base`` and with no
    HTTP status (litellm gives them a 500 of its own: :func:`unanswered`);
    context length -> ContextWindowExceeded; everything else by its HTTP
    status (429 RateLimited with Retry-After, 401/403 AuthFailed, 400
    BadRequest, 5xx ProviderUnavailable). Exceptions that are not litellm's /
    the OpenAI SDK's API errors are programming errors: None (re-raise them).
    """
    import openai  # litellm imported it already: cheap

    if not isinstance(exc, openai.OpenAIError):
        return None
    ex = lit.exceptions
    if isinstance(exc, ex.UnsupportedParamsError):  # refused before anything was sent (its status says 500)
        return BadRequest(f"{provider}: {_short(getattr(exc, 'message', None) or str(exc))} (nothing was sent)",
                          provider=provider)
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
    cause = unanswered(exc, openai)
    if isinstance(cause, openai.APITimeoutError):  # litellm.Timeout is one
        return timeout_error(provider, timeout_s, secrets=secrets)
    if cause is not None:
        return connection_error(provider, _connection_detail(cause, api_base), secrets=secrets)
    found, _ = error_detail(body)
    detail = found or _short(message)
    if isinstance(exc, ex.ContextWindowExceededError):
        return context_window_error(provider, detail, secrets=secrets)
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return error_for_status(status, headers=headers, body=body, message=None if found else detail,
                                provider=provider, secrets=secrets)
    return None


def unanswered(exc: BaseException, openai: Any) -> BaseException | None:
    """The OpenAI SDK's (or litellm's) connection error behind ``exc`` when the call got no answer; else None.

    litellm reports a call that never got an answer with an HTTP status of its own: its OpenAI handler
    wraps the SDK's ``APIConnectionError`` (refused, DNS, closed or reset) in its ``OpenAIError`` with
    ``status_code=500`` (its default for an exception without one), which it raises as
    ``litellm.InternalServerError``; a cut stream comes as ``MidStreamFallbackError`` (500) around
    ``litellm.APIConnectionError`` (whose status is always 500). The chain tells: litellm's own
    exceptions are passed through (``original_exception``, then the cause / context) down to the first
    one that is not litellm's. A connection error (``openai.APIConnectionError``, litellm's subclass
    included; ``APITimeoutError`` is one too) means no answer came; anything else (the SDK's
    ``APIStatusError`` of a real HTTP 500, an ``httpx.HTTPStatusError``) leaves the status as it is.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, openai.APIConnectionError):
            return e
        if not type(e).__module__.startswith("litellm"):
            return None
        e = getattr(e, "original_exception", None) or e.__cause__ or e.__context__
    return None


def _connection_detail(error: BaseException, api_base: str | None) -> str:
    """What failed: connecting or the connection, to where (the deployment's ``api_base``, else the URL the
    SDK called, without its query), and the lowest-level reason (``ConnectionRefusedError: ...``)."""
    import httpx  # litellm imported it already: cheap

    url: httpx.URL | None = None
    try:
        if api_base is not None:
            url = httpx.URL(api_base)
        elif not type(error).__module__.startswith("litellm"):  # litellm's own carries a made-up URL
            url = httpx.URL(error.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError, TypeError, httpx.InvalidURL):
        url = None
    # no user:password, no query (some providers take the key as ?key=)
    where = f"{url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path}" if url is not None else None
    chain = []
    e: BaseException | None = error
    while e is not None and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    connect = any(isinstance(c, httpx.ConnectError) for c in chain)
    what = ("could not connect" if connect else "lost the connection") + (f" to {where}" if where else "")
    root = chain[-1]
    if root is error:  # nothing below litellm's / the SDK's own message
        return what
    reason = getattr(root, "message", None)
    reason = " ".join((reason if isinstance(reason, str) and reason else str(root)).split())
    return f"{what} ({type(root).__name__}: {reason})" if reason else f"{what} ({type(root).__name__})"


def _short(message: str) -> str:
    # litellm prefixes messages with its class names ("litellm.RateLimitError: RateLimitError: OpenAIException - ...").
    return message.rsplit(" - ", 1)[-1].strip() if " - " in message else message


def made_up_finish(stream: Any) -> bool:
    """Did litellm end ``stream`` with a finish reason of its own (``stop``) although the upstream sent none?

    It does when the upstream's answer held no chunk at all (a body that is not server-sent events):
    ``received_finish_reason`` stays unset. (A litellm without that attribute is taken at its word.)"""
    received = getattr(stream, "received_finish_reason", _UNKNOWN)
    if received is _UNKNOWN:
        return False
    return received is None and getattr(stream, "intermittent_finish_reason", None) is None


_UNKNOWN = object()


def known_parameters(lit: Any, model: str, api_base: str | None, *, mock: bool = False) -> frozenset[str] | None:
    """The chat parameters litellm knows for ``model`` when it calls an OpenAI-compatible endpoint with it
    (the others may go through as they are); None when it is not such an endpoint (or litellm cannot tell)."""
    try:
        name, provider, _, _ = lit.get_llm_provider(model, custom_llm_provider="openai" if mock else None,
                                                    api_base=api_base)
    except Exception:  # litellm cannot tell: the call itself will say what is wrong
        return None
    if provider not in ("openai", "custom_openai") and provider not in lit.openai_compatible_providers:
        return None
    return frozenset(lit.get_supported_openai_params(model=name, custom_llm_provider=provider) or ())


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
        self._known: dict[str, frozenset[str] | None] = {}  # upstream model -> the parameters litellm knows for it

    def _kwargs(self, request: CompletionRequest, timeout_s: float | None, key: str | None, *,
                stream: bool = False, lit: Any = None) -> dict[str, Any]:
        """The keyword arguments of ``litellm.acompletion`` for one attempt (``lit``: litellm, once imported)."""
        lit = lit if lit is not None else _litellm
        kw = self._base.copy()
        model = kw["model"] = self._fixed_model or self.deployment.upstream_model(request.model)
        kw["messages"] = [dict(m) for m in request.messages]
        if timeout_s is not None:
            kw["timeout"] = timeout_s
        if key is not None:
            kw["api_key"] = key
        params = request.parameters()
        if params:
            kw.update(copy.deepcopy(params))  # litellm may adjust what it is given; the request stays as it was
            unknown = self._passthrough(lit, model, params)
            if unknown:
                kw["allowed_openai_params"] = unknown
        if request.provider_options:
            check_options(request.provider_options, self.name)
            kw["extra_body"] = copy.deepcopy(request.provider_options)
        if stream:
            kw["stream"] = True
            kw["stream_options"] = {"include_usage": True}
        if self.mock:
            kw["mock_response"] = mock.mock_response(lit, request, model)
        return kw

    def _passthrough(self, lit: Any, model: str, params: dict[str, Any]) -> list[str]:
        """The parameters of ``params`` litellm does not know for ``model``, when they can go through as they
        are (an OpenAI-compatible endpoint); [] otherwise (litellm refuses them: BadRequest, nothing sent)."""
        if model not in self._known:
            if len(self._known) >= 1024:
                self._known.clear()
            self._known[model] = known_parameters(lit, model, self.deployment.api_base, mock=self.mock)
        known = self._known[model]
        return [] if known is None else [name for name in params if name not in known]

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One ``litellm.acompletion``; litellm's errors mapped (:func:`map_exception`)."""
        lit = _litellm or await load_litellm()
        try:
            kwargs = self._kwargs(request, timeout_s, key, lit=lit)
            if timeout_s is None:
                response = await lit.acompletion(**kwargs)
            else:  # litellm's own timeout should fire first; this one is the backstop
                async with asyncio.timeout(timeout_s + TIMEOUT_GRACE_S):
                    response = await lit.acompletion(**kwargs)
        except (TimeoutError, ProviderError):
            raise
        except Exception as e:
            mapped = map_exception(e, lit, provider=self.name, timeout_s=timeout_s, secrets=(key,),
                                   api_base=self.deployment.api_base)
            if mapped is None:
                raise
            raise mapped from None
        return self._response(lit, response, request)

    async def prepare(self) -> None:
        """litellm's import (seconds, once per process) is not the upstream's time: outside the first piece's timeout."""
        if _litellm is None:
            await load_litellm()

    async def attempt_stream(self, request: CompletionRequest, timeout_s: float | None,
                             key: str | None) -> AsyncIterator[ChatDelta]:
        """One ``litellm.acompletion(stream=True)``: its chunks as ChatDelta pieces. litellm raises on a stream
        that ends before a finish_reason; the kit (:meth:`DeploymentProvider.stream`) bounds each wait."""
        lit = _litellm or await load_litellm()
        try:
            stream = await lit.acompletion(**self._kwargs(request, timeout_s, key, stream=True, lit=lit))
        except ProviderError:
            raise
        except Exception as e:
            raise self._mapped(e, lit, timeout_s, key) from None
        try:
            async for chunk in stream:
                delta = self._delta(chunk)
                if delta is not None and delta.finish_reason is not None and not self.mock and made_up_finish(stream):
                    delta = attrs.evolve(delta, finish_reason=None)  # the upstream never said it finished: a cut
                if delta is not None:
                    yield delta
        except Exception as e:
            if isinstance(e, ProviderError):
                raise
            raise self._mapped(e, lit, timeout_s, key) from None
        finally:
            await stream.aclose()  # closes the HTTP response (the connection) when the stream stops early

    def _mapped(self, e: Exception, lit: Any, timeout_s: float | None, key: str | None) -> Exception:
        mapped = map_exception(e, lit, provider=self.name, timeout_s=timeout_s, secrets=(key,),
                               api_base=self.deployment.api_base)
        if mapped is None:
            raise e
        return mapped

    def _delta(self, chunk: Any) -> ChatDelta | None:
        payload = chunk.model_dump()
        cost = None
        if payload.get("usage") is not None:
            cost = _number((getattr(chunk, "_hidden_params", None) or {}).get("response_cost"))
        return delta_of(payload, provider=self.name, cost=lambda prompt, completion: cost)

    def _response(self, lit: Any, response: Any, request: CompletionRequest) -> ProviderResponse:
        if not getattr(response, "choices", None):
            raise malformed_response(self.name, "the answer has no choices")
        cost = self._cost(lit, response)
        return response_of(response.model_dump(), provider=self.name, cost=lambda prompt, completion: cost,
                           session_id=request.session_id)

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
        return _number(cost)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


__all__ = ["LitellmProvider", "load_litellm", "map_exception"]
