"""The decision function alone, with fabricated attempt contexts."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ksi_retry import RetrySettings, alternatives, backoff_window, decide

from ksi_host.errors import (
    AuthFailed,
    BadRequest,
    DeadlineExceeded,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ksi_host.models import Attempt, AttemptContext, ProviderInfo

DEFAULT = RetrySettings(base_delay_s=1.0, max_delay_s=60.0, max_attempts=5)


def ctx(number: int = 1, provider: str | None = "a", *, now: float = 100.0, started: float = 100.0,
        timeout: float | None = None, history: tuple[Attempt, ...] = (), excluded: frozenset[str] = frozenset()
        ) -> AttemptContext:
    deadline = None if timeout is None else started + timeout
    return AttemptContext(number, provider, started, now, deadline, history, excluded)


def failures(provider: str, n: int) -> tuple[Attempt, ...]:
    return tuple(Attempt(i + 1, provider, "ProviderUnavailable", "503", 0.5) for i in range(n))


def test_final_error_gives_up_with_the_error_itself() -> None:
    error = BadRequest("bad")
    d = decide(error, ctx(), DEFAULT, ["b"], random.Random(0))
    assert d.action == "give_up"
    assert d.error is error


@pytest.mark.parametrize("error", [RateLimited("429", retry_after=30), ProviderTimeout(), ProviderUnavailable(), AuthFailed()])
def test_fails_over_at_once_when_another_deployment_is_available(error: Exception) -> None:
    d = decide(error, ctx(), DEFAULT, ["b"], random.Random(0))
    assert (d.action, d.delay_s, d.switch_provider) == ("retry", 0.0, True)


def test_no_failover_when_the_failed_attempt_had_no_provider() -> None:
    d = decide(ProviderUnavailable(), ctx(provider=None), DEFAULT, ["b"], random.Random(0))
    assert d.action == "retry" and not d.switch_provider


def test_auth_failed_without_another_deployment_gives_up() -> None:
    error = AuthFailed("key rejected", provider="a")
    d = decide(error, ctx(), DEFAULT, [], random.Random(0), model="gpt-4o")
    assert d.action == "give_up"
    assert type(d.error) is AuthFailed
    assert d.error.message == "key rejected (not retried: AuthFailed is final for deployment 'a' and no other deployment of 'gpt-4o' is available)"
    assert error.message == "key rejected"  # the original (recorded in the history) is untouched
    assert d.error.provider == "a" and d.error.__cause__ is error


def test_backoff_on_the_same_deployment_uses_full_jitter() -> None:
    history = failures("a", 2)  # this is the 3rd failure on "a": window 1 * 2**2 = 4
    d = decide(ProviderUnavailable(), ctx(3, history=history), DEFAULT, [], random.Random(7))
    assert (d.action, d.switch_provider) == ("retry", False)
    assert d.delay_s == random.Random(7).random() * 4.0


def test_backoff_counts_failures_of_this_deployment_only() -> None:
    # a failed twice (then excluded), b fails for the first time: window is base * 1
    history = failures("a", 2)
    d = decide(ProviderUnavailable(), ctx(3, "b", history=history, excluded=frozenset({"a"})), DEFAULT, [],
               random.Random(7))
    assert d.delay_s == random.Random(7).random() * 1.0


def test_backoff_window_grows_and_is_capped() -> None:
    s = RetrySettings(base_delay_s=0.5, max_delay_s=10.0, max_attempts=5)
    assert [backoff_window(s, n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_window(s, 100_000) == 10.0  # no overflow


def test_retry_after_is_a_floor_even_above_max_delay() -> None:
    s = RetrySettings(base_delay_s=1.0, max_delay_s=2.0, max_attempts=5)
    d = decide(RateLimited("429", retry_after=7.5), ctx(), s, [], random.Random(0))
    assert (d.action, d.delay_s) == ("retry", 7.5)
    # a jittered delay above the Retry-After stays
    big = RetrySettings(base_delay_s=100.0, max_delay_s=100.0, max_attempts=5)
    d = decide(RateLimited("429", retry_after=0.25), ctx(), big, [], random.Random(0))
    assert d.delay_s == random.Random(0).random() * 100.0 > 0.25


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "3"])
def test_unusable_retry_after_is_ignored(bad: object) -> None:
    d = decide(RateLimited("429", retry_after=bad), ctx(), DEFAULT, [], random.Random(3))
    assert d.delay_s == random.Random(3).random() * 1.0


def test_max_attempts_counts_every_attempt_and_says_so() -> None:
    s = RetrySettings(base_delay_s=1.0, max_delay_s=60.0, max_attempts=3, pattern="gpt-4o*")
    error = RateLimited("slow down", retry_after=1.0, provider="b")
    d = decide(error, ctx(3, "b", excluded=frozenset({"a"})), s, ["c"], random.Random(0))
    assert d.action == "give_up"
    assert type(d.error) is RateLimited
    assert d.error.message == "slow down (gave up after 3 attempt(s): max_attempts is 3 for 'gpt-4o*')"
    assert d.error.retry_after == 1.0 and d.error.provider == "b"
    assert d.error.to_dict() == {"type": "RateLimited", "message": d.error.message}
    assert decide(error, ctx(2, "b"), s, [], random.Random(0)).action == "retry"


def test_gives_up_when_the_deadline_has_passed() -> None:
    d = decide(ProviderTimeout("no answer"), ctx(2, now=110.0, timeout=10.0), DEFAULT, ["b"], random.Random(0))
    assert d.action == "give_up"
    assert isinstance(d.error, DeadlineExceeded)
    assert d.error.message == "gave up after 2 attempt(s): the 10s deadline has passed (last error ProviderTimeout: no answer)"


def test_the_fresh_clock_reading_counts_over_the_context() -> None:
    d = decide(ProviderTimeout(), ctx(1, now=101.0, timeout=10.0), DEFAULT, [], random.Random(0), now=111.0)
    assert isinstance(d.error, DeadlineExceeded)


def test_jitter_window_is_clamped_to_the_time_left() -> None:
    # 4th failure: window 8s, but only 0.5s remain
    for seed in range(50):
        d = decide(ProviderUnavailable(), ctx(4, now=109.5, timeout=10.0, history=failures("a", 3)), DEFAULT, [],
                   random.Random(seed))
        assert d.action == "retry"
        assert 0 <= d.delay_s < 0.5
        assert d.delay_s == random.Random(seed).random() * 0.5


def test_retry_after_past_the_deadline_gives_up_at_once() -> None:
    error = RateLimited("429 from upstream", retry_after=30.0)
    d = decide(error, ctx(1, now=102.0, timeout=10.0), DEFAULT, [], random.Random(0))
    assert d.action == "give_up"
    assert isinstance(d.error, DeadlineExceeded)
    assert d.error.message == (
        "gave up after 1 attempt(s): a asked to wait 30s (Retry-After) but only 8s of the 10s deadline remain "
        "(last error RateLimited: 429 from upstream)")


def test_retry_after_past_the_deadline_still_fails_over() -> None:
    d = decide(RateLimited("429", retry_after=30.0), ctx(1, now=102.0, timeout=10.0), DEFAULT, ["b"], random.Random(0))
    assert (d.action, d.delay_s, d.switch_provider) == ("retry", 0.0, True)


def test_alternatives_skip_open_circuits_the_failed_and_the_excluded() -> None:
    infos = [
        ProviderInfo("a", "gpt-4o", "p1"),
        ProviderInfo("b", "gpt-4o", "p1", state="open"),
        ProviderInfo("c", "gpt-4o*", "p2", state="half_open"),
        ProviderInfo("d", "*", "p2"),
        ProviderInfo("e", "gpt-4o", "p3"),
        ProviderInfo("c", "gpt-4o", "p3"),
    ]
    attempt = ctx(2, "a", excluded=frozenset({"d"}))
    assert alternatives(infos, attempt) == ["c", "e"]
    assert alternatives([ProviderInfo("a", "gpt-4o", "p1")], attempt) == []


@settings(max_examples=300, deadline=None)
@given(
    number=st.integers(1, 20),
    earlier=st.integers(0, 19),
    elapsed=st.floats(0, 200, allow_nan=False),
    timeout=st.none() | st.floats(0.01, 200, allow_nan=False),
    retry_after=st.none() | st.floats(0, 300, allow_nan=False),
    base=st.floats(0, 10, allow_nan=False),
    extra=st.floats(0, 100, allow_nan=False),
    max_attempts=st.integers(1, 30),
    seed=st.integers(0, 2**32),
    others=st.booleans(),
)
def test_a_retry_never_waits_to_the_deadline(number: int, earlier: int, elapsed: float, timeout: float | None,
                                             retry_after: float | None, base: float, extra: float,
                                             max_attempts: int, seed: int, others: bool) -> None:
    s = RetrySettings(base_delay_s=base, max_delay_s=base + extra, max_attempts=max_attempts)
    attempt = ctx(number, now=100.0 + elapsed, timeout=timeout, history=failures("a", min(earlier, number - 1)))
    d = decide(RateLimited("429", retry_after=retry_after), attempt, s, ["b"] if others else [], random.Random(seed))
    if number >= max_attempts:
        assert d.action == "give_up" and isinstance(d.error, RateLimited)
        return
    if timeout is not None and elapsed >= timeout:
        assert d.action == "give_up" and isinstance(d.error, DeadlineExceeded)
        return
    if others:
        assert (d.action, d.delay_s, d.switch_provider) == ("retry", 0.0, True)
        return
    if d.action == "give_up":  # only when the Retry-After reaches the deadline
        assert isinstance(d.error, DeadlineExceeded)
        assert timeout is not None and retry_after is not None and attempt.now + retry_after >= attempt.deadline
        return
    assert math.isfinite(d.delay_s) and d.delay_s >= (retry_after or 0.0)
    assert d.delay_s <= max(s.max_delay_s, retry_after or 0.0)
    if timeout is not None:
        assert attempt.now + d.delay_s < attempt.deadline
