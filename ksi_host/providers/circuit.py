"""A circuit breaker for one deployment: closed, open, half-open.

* **closed** (healthy): every call is allowed. Each operational failure adds
  one to the count of consecutive failures; a success resets it. At
  ``failures_to_open`` consecutive failures the circuit opens.
* **open**: no call is allowed until ``cooldown_s`` has passed.
* **half_open**: the cool-down has passed; exactly one trial call is allowed.
  Its success closes the circuit; its failure opens it for another cool-down.
  If the trial's outcome never arrives (the caller dropped the call) the trial
  slot frees again after its lease (``lease_s`` given to :meth:`try_acquire`).

Outcomes are reported with the *generation* read when the call started
(:attr:`CircuitBreaker.generation`, bumped on every state change), so the late
outcome of a call that started before the circuit opened does not count as the
half-open trial's. Time comes from ``clock`` (monotonic seconds, injectable).
All methods are synchronous and cheap: call them from the event loop thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs

from .validators import cooldown, positive_int

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@attrs.define(frozen=True)
class CircuitConfig:
    """The ``[<plugin>.circuit]`` table: when a deployment's circuit opens and for how long.

    ``failures_to_open``: consecutive failures (an integer >= 1). ``cooldown_s``:
    seconds an open circuit refuses calls (finite, >= 0, at most a week).
    """

    failures_to_open: int = attrs.field(default=5, validator=positive_int)
    cooldown_s: float = attrs.field(default=30.0, validator=cooldown)


class CircuitBreaker:
    """The circuit of one deployment. See the module docstring."""

    __slots__ = ("failures_to_open", "cooldown_s", "clock", "_state", "failures", "opened_at", "generation",
                 "_trial_until", "opens", "last_error", "on_change")

    def __init__(self, failures_to_open: int = 5, cooldown_s: float = 30.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        positive_int(None, attrs.fields(CircuitConfig).failures_to_open, failures_to_open)
        cooldown(None, attrs.fields(CircuitConfig).cooldown_s, cooldown_s)
        self.failures_to_open = failures_to_open
        self.cooldown_s = float(cooldown_s)
        self.clock = clock
        self._state = CLOSED
        self.failures = 0  # consecutive operational failures
        self.opened_at: float | None = None
        self.generation = 0
        self._trial_until: float | None = None  # half-open: the trial's lease end, None when no trial is out
        self.opens = 0  # how many times the circuit opened
        self.last_error: str | None = None
        self.on_change: Callable[[CircuitBreaker], None] | None = None  # called after a change worth persisting

    @classmethod
    def from_config(cls, config: CircuitConfig, *, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
        return cls(config.failures_to_open, config.cooldown_s, clock=clock)

    # -- reading ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open``, or ``half_open`` (an open circuit whose cool-down has passed)."""
        if self._state == OPEN and self.clock() >= self.opens_until:  # type: ignore[operator]
            return HALF_OPEN
        return self._state

    @property
    def opens_until(self) -> float | None:
        """The clock reading at which an open circuit allows its trial call (None unless open)."""
        if self._state != OPEN or self.opened_at is None:
            return None
        return self.opened_at + self.cooldown_s

    def cooldown_left(self) -> float:
        """Seconds until the trial call is allowed: 0 unless open and cooling down."""
        until = self.opens_until
        return 0.0 if until is None else max(0.0, until - self.clock())

    # -- calls ------------------------------------------------------------------------

    def try_acquire(self, lease_s: float | None = None) -> bool:
        """Claim the right to make one call now.

        Closed: always True. Open before the cool-down ends: False. Otherwise
        the circuit is half-open and this claims its one trial call (True),
        unless a trial is already out and its lease (``lease_s`` seconds from
        its claim; None: one ``cooldown_s``) has not ended (False).
        """
        if self._state == CLOSED:
            return True
        now = self.clock()
        if self._state == OPEN:
            if now < self.opens_until:  # type: ignore[operator]
                return False
            self._state = HALF_OPEN
            self.generation += 1
        elif self._trial_until is not None and now < self._trial_until:
            return False
        self._trial_until = now + (self.cooldown_s if lease_s is None else lease_s)
        return True

    def record_success(self, generation: int | None = None) -> None:
        """A call that started at ``generation`` succeeded (None: a call of the current one)."""
        if generation is not None and generation != self.generation:
            return
        if self._state == OPEN:
            return
        if self._state == HALF_OPEN:
            self._close()
        elif self.failures == 0:
            return
        self.failures = 0
        self._changed()

    def record_failure(self, generation: int | None = None, error: str | None = None) -> None:
        """A call that started at ``generation`` failed operationally (the deployment's fault)."""
        if generation is not None and generation != self.generation:
            return
        if self._state == OPEN:
            return
        self.last_error = error
        self.failures += 1
        if self._state == HALF_OPEN or self.failures >= self.failures_to_open:
            self._open()
        self._changed()

    def record_error(self, generation: int | None, error: BaseException) -> bool:
        """Record a call that raised ``error``, by the rule every provider plugin follows.

        A :class:`~ksi_host.errors.BadRequest` (context window included) is the
        request's fault, not the deployment's: neutral. Any other error counts
        as a failure. Returns True when this call opened the circuit (log it).
        """
        from ..errors import BadRequest

        if isinstance(error, BadRequest):
            self.record_neutral(generation)
            return False
        opens = self.opens
        self.record_failure(generation, f"{type(error).__name__}: {getattr(error, 'message', None) or error}")
        return self.opens != opens

    def record_attempt_error(self, generation: int | None, error: Any, *, name: str, log: logging.Logger) -> bool:
        """:meth:`record_error` for a provider's failed attempt, logged as every provider plugin logs it.

        ``error`` is the :class:`~ksi_host.errors.OperationalError` the attempt
        raises; ``name`` the deployment's; ``log`` the plugin's logger. Logs the
        failure at debug level, and a warning when it opened the circuit.
        Returns True then.
        """
        if log.isEnabledFor(logging.DEBUG):
            log.debug("deployment %s failed: %s: %s", name, error.type, error.message)
        opened = self.record_error(generation, error)
        if opened:
            log.warning("circuit of deployment %s opened after %d consecutive failure(s) (last: %s); cool-down %gs",
                        name, self.failures, error.type, self.cooldown_s)
        return opened

    def record_neutral(self, generation: int | None = None) -> None:
        """A call ended in a way that says nothing about the deployment's health
        (a bad request, for example). Frees a half-open trial slot; changes nothing else."""
        if generation is not None and generation != self.generation:
            return
        if self._state == HALF_OPEN:
            self._trial_until = None

    def restore(self, *, state: str, failures: int, cooldown_left: float = 0.0, opens: int = 0,
                last_error: str | None = None) -> None:
        """Take over a state saved earlier (another process, a previous run).

        ``state`` ``open`` (or ``half_open``) restores an open circuit with
        ``cooldown_left`` seconds still to wait (0: its trial call is due);
        anything else a closed one with ``failures`` consecutive failures.
        """
        self.failures = max(0, int(failures))
        self.opens = max(0, int(opens))
        self.last_error = last_error
        self._trial_until = None
        self.generation += 1
        if state in (OPEN, HALF_OPEN):
            self._state = OPEN
            left = min(max(0.0, float(cooldown_left)), self.cooldown_s)
            self.opened_at = self.clock() - (self.cooldown_s - left)
        else:
            self._state = CLOSED
            self.opened_at = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _open(self) -> None:
        self._state = OPEN
        self.opened_at = self.clock()
        self._trial_until = None
        self.generation += 1
        self.opens += 1

    def _close(self) -> None:
        self._state = CLOSED
        self.opened_at = None
        self._trial_until = None
        self.generation += 1

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures={self.failures}/{self.failures_to_open}>"
