"""Which failures are worth another attempt.

=======================  ==============  ==============================================
error                    verdict         meaning
=======================  ==============  ==============================================
RateLimited              ``retry``       fail over to another deployment, else back off
ProviderTimeout          ``retry``       same
ProviderUnavailable      ``retry``       same
AuthFailed               ``switch``      final for this deployment; another deployment
                                         of the model may still work (fail over only)
BadRequest               ``final``       retrying cannot help
ContextWindowExceeded    ``final``       (a BadRequest)
ValidationError          ``final``       the input is wrong
DeadlineExceeded         ``final``       the request's time is up
Cancelled                ``final``       nobody wants the answer any more
NoProviderError          ``final``       nothing serves the model
MissingPluginError       ``final``       a plugin is missing
any other                ``retry`` if its ``retryable`` attribute is True, else ``final``
=======================  ==============  ==============================================

Subclasses take the verdict of their nearest listed ancestor.
"""

from __future__ import annotations

import enum

from ksi_host.errors import (
    AuthFailed,
    BadRequest,
    Cancelled,
    ContextWindowExceeded,
    DeadlineExceeded,
    MissingPluginError,
    NoProviderError,
    OperationalError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    ValidationError,
)


class Verdict(enum.Enum):
    RETRY = "retry"  # transient: fail over, else back off on the same deployment
    SWITCH = "switch"  # final for this deployment only: fail over, else give up
    FINAL = "final"  # no further attempt can help


CLASSIFICATION: dict[type[OperationalError], Verdict] = {
    RateLimited: Verdict.RETRY,
    ProviderTimeout: Verdict.RETRY,
    ProviderUnavailable: Verdict.RETRY,
    AuthFailed: Verdict.SWITCH,
    BadRequest: Verdict.FINAL,
    ContextWindowExceeded: Verdict.FINAL,
    ValidationError: Verdict.FINAL,
    DeadlineExceeded: Verdict.FINAL,
    Cancelled: Verdict.FINAL,
    NoProviderError: Verdict.FINAL,
    MissingPluginError: Verdict.FINAL,
}


def classify(error: OperationalError) -> Verdict:
    """The verdict for ``error`` (see the module docstring)."""
    for cls in type(error).__mro__:
        verdict = CLASSIFICATION.get(cls)
        if verdict is not None:
            return verdict
    return Verdict.RETRY if getattr(error, "retryable", False) is True else Verdict.FINAL
