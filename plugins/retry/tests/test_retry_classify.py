from __future__ import annotations

import pytest
from ksi_retry import Verdict, classify

from ksi_host.errors import (
    AuthFailed,
    BadRequest,
    Cancelled,
    ContextWindowExceeded,
    DeadlineExceeded,
    MissingPluginError,
    NoProviderError,
    OperationalError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    ValidationError,
)


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (RateLimited("429", retry_after=3), Verdict.RETRY),
        (ProviderTimeout(), Verdict.RETRY),
        (ProviderUnavailable("503"), Verdict.RETRY),
        (AuthFailed("401"), Verdict.SWITCH),
        (BadRequest("400"), Verdict.FINAL),
        (ContextWindowExceeded("too long"), Verdict.FINAL),
        (ValidationError("messages", "bad"), Verdict.FINAL),
        (DeadlineExceeded("late"), Verdict.FINAL),
        (Cancelled("cancelled"), Verdict.FINAL),
        (NoProviderError("none"), Verdict.FINAL),
        (MissingPluginError("ksi_select_provider"), Verdict.FINAL),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.value,
)
def test_classification_table(error: OperationalError, verdict: Verdict) -> None:
    assert classify(error) is verdict


def test_subclass_takes_nearest_listed_ancestor() -> None:
    class Overloaded(ProviderUnavailable):
        pass

    class QuotaExceeded(RateLimited):
        retryable = False  # the table decides, not the hint

    class TooLong(ContextWindowExceeded):
        retryable = True

    assert classify(Overloaded()) is Verdict.RETRY
    assert classify(QuotaExceeded()) is Verdict.RETRY
    assert classify(TooLong()) is Verdict.FINAL


def test_unknown_errors_are_final_unless_marked_retryable() -> None:
    class Odd(ProviderError):
        pass

    class Flaky(OperationalError):
        retryable = True

    assert classify(Odd("?")) is Verdict.FINAL
    assert classify(OperationalError("?")) is Verdict.FINAL
    assert classify(Flaky("?")) is Verdict.RETRY
    assert classify(Odd("?", retryable=True)) is Verdict.RETRY
    assert classify(Odd("?", retryable="yes")) is Verdict.FINAL  # only True counts
