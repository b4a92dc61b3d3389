"""One attempt at one deployment, with its circuit: :class:`DeploymentProvider`.

A provider plugin's provider objects (what ``ksi_select_provider`` returns, one
per deployment) subclass it and write :meth:`DeploymentProvider.attempt`: the
upstream call itself. :meth:`DeploymentProvider.complete` owns what every
attempt does around it, the same for every plugin::

    class MyProvider(DeploymentProvider):
        log = logging.getLogger("my_plugin")

        async def attempt(self, request, timeout_s, key):
            ...  # one upstream call; raise a ProviderError (mapped) or TimeoutError
            return ProviderResponse(text, usage=Usage(...))

        async def attempt_stream(self, request, timeout_s, key):   # optional: the provider can stream
            async with ...:  # one upstream call, closed when this generator is closed
                for piece in ...:
                    yield ChatDelta(content=...)                    # the last one with finish_reason
                                                                    # (and usage, with it or after it)

:meth:`DeploymentProvider.stream` does for a streamed attempt what ``complete``
does: the key, the timeouts (``timeout_s`` bounds the wait for the first piece
and for each one after it), and the outcome on the circuit: a success only when
the stream ended after a piece with a ``finish_reason``; a failure when it
raised a ProviderError, timed out, or ended without one (a cut:
ProviderUnavailable). A plugin without ``attempt_stream`` streams a request as
one piece, from ``attempt``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from ..errors import ProviderError, ProviderUnavailable
from ..models import ChatDelta, CompletionRequest, ProviderResponse
from ..streaming import deltas_of
from .circuit import CircuitBreaker
from .errormap import timeout_error


class DeploymentProvider:
    """A deployment ready to call (satisfies :class:`ksi_host.models.Provider`).

    ``complete`` makes exactly one attempt: it reads the deployment's key from its
    environment variable (AuthFailed naming the variable when unset), runs
    :meth:`attempt`, and records the outcome on the deployment's circuit: a
    success, or the ProviderError it raised (a TimeoutError becomes
    ProviderTimeout first). Anything else it raised is a programming error and
    passes through untouched, the circuit left as it was.
    """

    log: ClassVar[logging.Logger] = logging.getLogger("ksi_host.provider")
    """Where the circuit logs this deployment's failures and openings (a plugin names its own)."""
    supports: ClassVar[frozenset[str] | None] = None
    """What this deployment can send (:attr:`ksi_host.models.ProviderInfo.supports`: chat parameter names
    and content part types); None: the whole chat-completions surface. The host sends a request here only
    when this covers :meth:`CompletionRequest.needs <ksi_host.models.CompletionRequest.needs>`."""

    def __init__(self, deployment: Any, breaker: CircuitBreaker) -> None:
        self.deployment = deployment
        self.breaker = breaker
        self.name: str = deployment.name
        self.timeout_s: float | None = deployment.timeout_s

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One upstream call for ``request`` within ``timeout_s`` seconds (None: no limit), with the API
        ``key`` (None when the deployment names no variable).

        Return the answer. Raise a :class:`~ksi_host.errors.ProviderError` for an upstream failure (map the
        client library's errors, and never put ``key`` into a message: :mod:`ksi_host.providers.errormap` helps), or
        let a TimeoutError out when the time is up."""
        raise NotImplementedError(f"{type(self).__name__} must define attempt(request, timeout_s, key)")

    async def attempt_stream(self, request: CompletionRequest, timeout_s: float | None,
                             key: str | None) -> AsyncIterator[ChatDelta]:
        """One streamed upstream call for ``request`` (an async generator of :class:`~ksi_host.models.ChatDelta`):
        its pieces as they arrive, the last with the ``finish_reason``; ``usage`` with it or after it.

        Optional: without it, :meth:`stream` serves a streamed request with :meth:`attempt`, as one piece.
        Raise ProviderErrors as :meth:`attempt` does; end only when the upstream said it finished (return
        early on a cut and :meth:`stream` raises ProviderUnavailable). When this generator is closed before
        its end (the consumer left, a timeout), close the upstream call (``async with`` does)."""
        raise NotImplementedError  # never called: stream() uses attempt() when a subclass does not write this
        yield  # pragma: no cover  (makes this an async generator)

    async def prepare(self) -> None:
        """Work an attempt needs first that is not the upstream's time (a lazy import, a client to open): the
        host awaits it before each attempt's timeout and latency start (and :meth:`stream` before the wait for
        the first piece). Nothing by default."""

    @property
    def can_stream(self) -> bool:
        """Does this provider stream its answers piece by piece (does its class write :meth:`attempt_stream`)?"""
        return type(self).attempt_stream is not DeploymentProvider.attempt_stream

    async def stream(self, request: CompletionRequest, *, timeout_s: float | None) -> AsyncIterator[ChatDelta]:
        """One streamed upstream attempt (see :class:`~ksi_host.models.ChatDelta` for the contract).

        ``timeout_s`` (None: the deployment's) bounds the wait for the first piece and between pieces:
        ProviderTimeout (:meth:`prepare` is awaited before, outside it). A ProviderError raised, a timeout, or an end without a piece that carried a
        ``finish_reason`` (ProviderUnavailable: the answer was cut off) count against the circuit; an
        end after one counts as a success. Closing this iterator early closes the upstream call and
        leaves the circuit as it was (a half-open trial is freed)."""
        if timeout_s is None:
            timeout_s = self.timeout_s
        if not self.can_stream:  # one piece, from attempt()
            yield deltas_of(await self.complete(request, timeout_s=timeout_s))
            return
        await self.prepare()
        generation = self.breaker.generation
        finished = False
        ended = False
        try:
            pieces = self.attempt_stream(request, timeout_s, self.deployment.api_key())
        except ProviderError as e:
            self._raise(generation, e)
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout_s):
                        delta = await anext(pieces)
                except StopAsyncIteration:
                    break
                finished = finished or delta.finish_reason is not None
                yield delta
            ended = True
        except TimeoutError:
            ended = True
            self._raise(generation, timeout_error(self.name, timeout_s, "waiting for the next piece of the stream"))
        except ProviderError as e:
            ended = True
            self._raise(generation, e)
        finally:
            await pieces.aclose()  # the upstream call ends with the stream, however it ends
            if not ended:  # closed early (the consumer left, a cancel): says nothing about the deployment
                self.breaker.record_neutral(generation)
        if not finished:
            self._raise(generation, ProviderUnavailable(
                f"{self.name}: the stream ended before the upstream said it finished (no finish_reason): "
                "the answer was cut off", provider=self.name))
        self.breaker.record_success(generation)

    def _raise(self, generation: int, err: ProviderError) -> None:
        if err.provider is None:
            err.provider = self.name
        self._failed(generation, err)
        raise err

    async def complete(self, request: CompletionRequest, *, timeout_s: float | None) -> ProviderResponse:
        """One upstream attempt. Returns the answer or raises a ksi_host ProviderError."""
        if timeout_s is None:
            timeout_s = self.timeout_s
        generation = self.breaker.generation
        try:
            response = await self.attempt(request, timeout_s, self.deployment.api_key())
        except TimeoutError:
            err = timeout_error(self.name, timeout_s)
            self._failed(generation, err)
            raise err from None
        except ProviderError as e:
            if e.provider is None:
                e.provider = self.name
            self._failed(generation, e)
            raise
        self.breaker.record_success(generation)
        return response

    def _failed(self, generation: int, err: ProviderError) -> None:
        self.breaker.record_attempt_error(generation, err, name=self.name, log=self.log)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} model={self.deployment.model!r} {self.breaker.state}>"


__all__ = ["DeploymentProvider"]
