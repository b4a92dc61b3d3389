"""ksi-tokens: the token usage ledger of KSI host.

Implements ``ksi_record_usage`` (one durable row per upstream call that
reported usage), ``ksi_usage_report`` (calls, requests, tokens and cost per
group) and ``ksi_status`` (running totals). See ``README.md``.
"""

from .reports import GROUPINGS

__all__ = ["GROUPINGS"]
