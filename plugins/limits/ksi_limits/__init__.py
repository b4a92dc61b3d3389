"""ksi-limits: rate limits and spending budgets for KSI host (``ksi_admit``).

See :mod:`ksi_limits.plugin` for the hooks and the README for the ``[limits]`` table.
"""

from ksi_host.windows import Claim, Key, Limit, Refusal, WindowState, WindowStore

from .store import LocalWindowStore

__all__ = ["Claim", "Key", "Limit", "LocalWindowStore", "Refusal", "WindowState", "WindowStore"]
