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
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from ..errors import ProviderError
from ..models import CompletionRequest, ProviderResponse
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
