"""The failure policy: what one failed attempt becomes.

:func:`decide` is a pure function of the error, the attempt context, the
model's settings, the other deployments still available and a random source.
In order:

1. A ``final`` error (see :mod:`ksi_retry.classify`) ends the request as is.
2. ``max_attempts`` counts every attempt of the request, on any deployment:
   when this was the last one allowed, give up with the error, its message
   saying so.
3. When the deadline (``timeout_s``) has already passed, give up with
   :class:`~ksi_host.errors.DeadlineExceeded` naming the last error.
4. When another deployment of the model is available (not the one that
   failed, not already excluded, circuit not open), fail over to it at once:
   ``retry(0, switch_provider=True)``. No wait: the other deployment has not
   failed, so there is nothing to back off from.
5. ``AuthFailed`` with no other deployment left: give up.
6. Back off on the same deployment with full jitter:
   ``delay = U[0, min(max_delay_s, base_delay_s * 2 ** (n - 1), remaining))``
   where ``n`` counts this deployment's failures in the request (1 for its
   first). A Retry-After the provider sent is a floor: ``delay =
   max(delay, retry_after)``, honoured even above ``max_delay_s``. If the
   Retry-After reaches the deadline, give up at once with DeadlineExceeded
   (waiting for it would pass the deadline; retrying sooner would be refused).

A wait never reaches the deadline: the jitter window is clamped to the time
that remains.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Sequence

from ksi_host.errors import DeadlineExceeded, OperationalError
from ksi_host.models import AttemptContext, FailureDecision, ProviderInfo

from .classify import Verdict, classify
from .config import RetrySettings

log = logging.getLogger("ksi_host.retry")

_MAX_EXPONENT = 1000  # 2.0 ** 1000 is still a finite float


def alternatives(providers: Iterable[ProviderInfo], attempt: AttemptContext) -> list[str]:
    """Names of the deployments a failover could go to, in try order: available
    (circuit not open), not the one that failed, not already excluded."""
    seen: list[str] = []
    for p in providers:
        if p.available and p.name != attempt.provider and p.name not in attempt.excluded and p.name not in seen:
            seen.append(p.name)
    return seen


def backoff_window(settings: RetrySettings, failures: int) -> float:
    """The full-jitter window after the ``failures``-th failure (from 1) on one deployment."""
    exponent = min(max(failures - 1, 0), _MAX_EXPONENT)
    return min(settings.max_delay_s, settings.base_delay_s * 2.0**exponent)


def retry_after(error: OperationalError) -> float | None:
    """The provider's Retry-After in seconds, if it sent a usable one."""
    value = getattr(error, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def annotated(error: OperationalError, note: str) -> OperationalError:
    """A copy of ``error`` (same type and attributes) whose message ends with ``(note)``.

    The original is left alone: the host records its message in the attempt history.
    """
    cls = type(error)
    copy = cls.__new__(cls)
    copy.__dict__.update(error.__dict__)
    copy.message = f"{error.message} ({note})"
    copy.args = (copy.message,)
    copy.__cause__ = error
    return copy


def _timeout(attempt: AttemptContext) -> str:
    assert attempt.deadline is not None
    return f"{attempt.deadline - attempt.started_at:g}s"


def decide(
    error: OperationalError,
    attempt: AttemptContext,
    settings: RetrySettings,
    others: Sequence[str],
    rng: random.Random,
    *,
    now: float | None = None,
    model: str | None = None,
) -> FailureDecision:
    """What the failed ``attempt`` becomes (see the module docstring).

    ``others``: the deployments a failover could go to (:func:`alternatives`).
    ``now``: a fresh clock reading (defaults to ``attempt.now``). ``model``
    only names the model in messages.
    """
    verdict = classify(error)
    if verdict is Verdict.FINAL:
        return FailureDecision.give_up(error)
    n = attempt.number
    last = f"last error {error.type}: {error.message}"
    if n >= settings.max_attempts:
        where = f" for {settings.pattern!r}" if settings.pattern else ""
        return FailureDecision.give_up(
            annotated(error, f"gave up after {n} attempt(s): max_attempts is {settings.max_attempts}{where}"))
    now = attempt.now if now is None else now
    remaining = None if attempt.deadline is None else attempt.deadline - now
    if remaining is not None and remaining <= 0:
        return FailureDecision.give_up(DeadlineExceeded(
            f"gave up after {n} attempt(s): the {_timeout(attempt)} deadline has passed ({last})"))
    can_switch = attempt.provider is not None and bool(others)
    if can_switch:
        log.debug("attempt %d on %s failed with %s: failing over to %s", n, attempt.provider, error.type, others[0])
        return FailureDecision.retry(0.0, switch_provider=True)
    if verdict is Verdict.SWITCH:
        of = f" of {model!r}" if model else ""
        return FailureDecision.give_up(annotated(
            error, f"not retried: {error.type} is final for deployment {attempt.provider!r} "
                   f"and no other deployment{of} is available"))
    failures = 1 + sum(1 for a in attempt.history if a.provider == attempt.provider)
    window = backoff_window(settings, failures)
    floor = retry_after(error)
    if remaining is not None:
        if floor is not None and now + floor >= attempt.deadline:
            return FailureDecision.give_up(DeadlineExceeded(
                f"gave up after {n} attempt(s): {attempt.provider or 'the provider'} asked to wait {floor:g}s "
                f"(Retry-After) but only {remaining:.3g}s of the {_timeout(attempt)} deadline remain ({last})"))
        window = min(window, remaining)
    delay = rng.random() * window  # in [0, window): short of the deadline
    if floor is not None:
        delay = max(delay, floor)
    if attempt.deadline is not None and now + delay >= attempt.deadline:
        delay = floor or 0.0  # float rounding only; now + floor < deadline was checked
    log.debug("attempt %d on %s failed with %s: retrying in %.3fs", n, attempt.provider, error.type, delay)
    return FailureDecision.retry(delay)
