"""ksi-postgres: the queue and the usage ledger of KSI host on PostgreSQL, shared by several hosts.

Implements the queue's hooks (``ksi_enqueue``, ``ksi_cancel``, ``ksi_clear_session``, ``ksi_drain``,
``ksi_request_details``, ``ksi_list_requests``) and the ledger's (``ksi_attempt_started``,
``ksi_record_usage``, ``ksi_usage_report``) when ``[postgres] dsn_env`` is set, and then alone
(``ksi_exclusive_hooks``). See ``README.md``.
"""
