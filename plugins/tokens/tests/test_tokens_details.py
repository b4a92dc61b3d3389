"""``ksi_request_details``: the ledger's rows of one request (``calls``), every column, in the order sent."""

from __future__ import annotations

import sqlite3

from ksi_tokens.plugin import Plugin
from ksi_tokens.schema import TABLE
from tokens_helpers import RetryPolicy, ledger, request

from ksi_host.errors import RateLimited
from ksi_host.models import Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


async def test_the_calls_of_a_request_every_column(make_host, ksi_db_path):
    provider = FakeProvider("p", script=[RateLimited("slow down", retry_after=0.0), "ok"], usage=Usage(3, 2, 5, 0.25))
    async with make_host(Plugin(), DirectQueue(), ScriptedProviders(provider), RetryPolicy()) as host:
        retried = request(request_id="r1", session_id="s", agent_id="a", purpose="p")
        await host.complete(retried)
        await host.complete(request(request_id="r2"))
        details = await host.request_details("r1")
        rows = await ledger(host)
        assert await host.request_details("nobody") is None  # no call: the ledger does not know it
    assert details == {"calls": [r for r in rows if r["request_id"] == "r1"]}
    first, second = details["calls"]
    assert (first["attempt"], first["outcome"], first["total_tokens"]) == (1, "RateLimited", None)
    assert (second["attempt"], second["outcome"], second["total_tokens"], second["cost_usd"]) == (2, "ok", 5, 0.25)
    con = sqlite3.connect(ksi_db_path)
    columns = [c[1] for c in con.execute(f"PRAGMA table_info({TABLE})")]
    plan = con.execute(f"EXPLAIN QUERY PLAN SELECT * FROM {TABLE} WHERE request_id = 'r1' ORDER BY id").fetchall()
    con.close()
    assert list(first) == columns
    assert "USING INDEX token_usage_request" in plan[0][-1]  # a few rows read, not the whole ledger
