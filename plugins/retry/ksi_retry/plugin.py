"""The ``retry`` plugin: implements ``ksi_handle_failure`` with :func:`ksi_retry.policy.decide`."""

from __future__ import annotations

import random
from typing import Any

from ksi_host import hookimpl
from ksi_host.errors import OperationalError
from ksi_host.models import AttemptContext, CompletionRequest, FailureDecision

from .classify import Verdict, classify
from .config import RetryConfig
from .policy import alternatives, decide

TABLE = "retry"


class Plugin:
    """Failure policy: classification, failover before backoff, full-jitter backoff,
    Retry-After, the request deadline and ``max_attempts``.

    ``rng`` makes the jitter deterministic in tests (``Plugin(rng=random.Random(1))``);
    without it the jitter is seeded from ``[retry] seed`` (random when absent).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._injected_rng = rng
        self.rng = rng if rng is not None else random.Random()

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, RetryConfig

    @hookimpl
    def ksi_startup(self, host: Any) -> None:
        if self._injected_rng is None:
            self.rng = random.Random(self._config(host).seed)

    @staticmethod
    def _config(host: Any) -> RetryConfig:
        config = host.config.get(TABLE)
        return config if isinstance(config, RetryConfig) else RetryConfig()

    @hookimpl
    async def ksi_handle_failure(
        self, host: Any, request: CompletionRequest, error: OperationalError, attempt: AttemptContext
    ) -> FailureDecision:
        settings = self._config(host).settings_for(request.model)
        others: list[str] = []
        if (classify(error) is not Verdict.FINAL and attempt.provider is not None
                and attempt.number < settings.max_attempts):
            others = alternatives(await host.providers(request.model), attempt)
        return decide(error, attempt, settings, others, self.rng, now=host.clock(), model=request.model)

    @hookimpl
    def ksi_status(self, host: Any) -> dict[str, Any]:
        return {TABLE: self._config(host).to_dict()}
