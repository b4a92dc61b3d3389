"""ksi_host.providers.circuit: the circuit breaker of one deployment."""

from __future__ import annotations

import pytest

from ksi_host.providers.circuit import CircuitBreaker, CircuitConfig


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def breaker(failures: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failures, cooldown, clock=clock), clock


def test_closed_allows_and_counts_consecutive_failures() -> None:
    b, _ = breaker()
    assert b.state == "closed" and b.try_acquire()
    b.record_failure()
    b.record_failure()
    assert (b.state, b.failures) == ("closed", 2)
    b.record_success()
    assert b.failures == 0  # a success breaks the run
    for _ in range(2):
        b.record_failure()
    assert b.state == "closed"
    b.record_failure(error="ProviderUnavailable: boom")
    assert b.state == "open" and b.opens == 1
    assert b.last_error == "ProviderUnavailable: boom"


def test_open_refuses_until_cooldown_then_allows_one_trial() -> None:
    b, clock = breaker(failures=1, cooldown=10)
    b.record_failure()
    assert not b.try_acquire()
    assert b.cooldown_left() == 10
    clock.t += 9.99
    assert not b.try_acquire()
    clock.t += 0.01
    assert b.state == "half_open" and b.cooldown_left() == 0
    assert b.try_acquire(lease_s=5)  # the trial
    assert b.state == "half_open"
    assert not b.try_acquire(lease_s=5)  # only one trial at a time
    b.record_success(b.generation)
    assert b.state == "closed" and b.failures == 0
    assert b.try_acquire()


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    b, clock = breaker(failures=2, cooldown=10)
    b.record_failure()
    b.record_failure()
    clock.t += 10
    assert b.try_acquire()
    b.record_failure(b.generation)
    assert b.state == "open" and b.opens == 2
    assert b.cooldown_left() == 10


def test_lost_trial_frees_the_slot_after_its_lease() -> None:
    b, clock = breaker(failures=1, cooldown=10)
    b.record_failure()
    clock.t += 10
    assert b.try_acquire(lease_s=3)
    clock.t += 2.9
    assert not b.try_acquire(lease_s=3)
    clock.t += 0.1
    assert b.try_acquire(lease_s=3)  # the first trial never reported back


def test_late_outcomes_of_older_calls_are_ignored() -> None:
    b, clock = breaker(failures=1, cooldown=10)
    started_closed = b.generation
    b.record_failure(started_closed)
    assert b.state == "open"
    b.record_success(started_closed)  # a call that started before the circuit opened
    assert b.state == "open"
    clock.t += 10
    assert b.try_acquire()
    b.record_success(started_closed)  # still not the trial's outcome
    assert b.state == "half_open"
    b.record_failure(started_closed)
    assert b.state == "half_open"
    b.record_success(b.generation)
    assert b.state == "closed"


def test_neutral_outcome_frees_the_trial_without_deciding() -> None:
    b, clock = breaker(failures=1, cooldown=10)
    b.record_failure()
    clock.t += 10
    assert b.try_acquire()
    b.record_neutral(b.generation)
    assert b.state == "half_open"
    assert b.try_acquire()  # another trial may go


def test_what_status_and_the_store_read() -> None:
    b, clock = breaker(failures=1)
    b.record_failure(error="RateLimited: x")
    assert (b.state, b.failures, b.cooldown_left(), b.opens, b.last_error) == ("open", 1, 10.0, 1, "RateLimited: x")
    assert b.opens_until == clock.t + 10


def test_zero_cooldown_is_half_open_at_once() -> None:
    b, _ = breaker(failures=1, cooldown=0)
    b.record_failure()
    assert b.state == "half_open"
    assert b.try_acquire()


def test_from_config_and_validation() -> None:
    b = CircuitBreaker.from_config(CircuitConfig(failures_to_open=2, cooldown_s=1.5))
    assert (b.failures_to_open, b.cooldown_s) == (2, 1.5)
    with pytest.raises(ValueError, match="failures_to_open"):
        CircuitConfig(failures_to_open=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitConfig(cooldown_s=-1)
    with pytest.raises(ValueError, match="failures_to_open"):
        CircuitBreaker(True)  # type: ignore[arg-type]


@pytest.mark.parametrize("cooldown", [float("inf"), float("nan"), -0.5, 8 * 24 * 3600.0, "30", True])
def test_cooldown_must_be_finite_and_in_range(cooldown: object) -> None:
    """``cooldown_s = inf`` overflowed when status dated the circuit's end; ``nan`` never blocked a call."""
    with pytest.raises(ValueError, match="cooldown_s must be a number of seconds >= 0 and at most"):
        CircuitConfig(cooldown_s=cooldown)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker(1, cooldown)  # type: ignore[arg-type]
