"""ksi-limits: rate limits and spending budgets for KSI host (``ksi_admit``).

See :mod:`ksi_limits.plugin` for the hooks and the README for the ``[limits]`` table.
"""

from .store import Claim, Limit, LocalWindowStore, Refusal, WindowStore

__all__ = ["Claim", "Limit", "LocalWindowStore", "Refusal", "WindowStore"]
