"""ksi-tokens: the token usage ledger of KSI host.

Implements ``ksi_attempt_started`` and ``ksi_record_usage`` (one durable row
per upstream call, written before it is sent, completed when it ends),
``ksi_usage_report`` (calls, requests, calls of unknown outcome, tokens and
cost per group), ``ksi_status`` (running totals) and ``ksi_request_details``
(the rows of one request). See ``README.md``.
"""

from .reports import GROUPINGS

__all__ = ["GROUPINGS"]
