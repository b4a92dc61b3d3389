"""ksi-retry: the failure policy of KSI host (``ksi_handle_failure``)."""

from .classify import CLASSIFICATION, Verdict, classify
from .config import ModelRetry, RetryConfig, RetrySettings
from .plugin import Plugin
from .policy import alternatives, backoff_window, decide

__all__ = [
    "CLASSIFICATION",
    "ModelRetry",
    "Plugin",
    "RetryConfig",
    "RetrySettings",
    "Verdict",
    "alternatives",
    "backoff_window",
    "classify",
    "decide",
]
