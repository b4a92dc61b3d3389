"""ksi-limits on several hosts sharing one PostgreSQL database (ksi-postgres): the windows and the budgets are
the database's, not each host's.

Three ``Host`` objects in this process, each with its own plugins (so each ksi-limits its own Admission), the
OpenAI-compatible provider pointing at the local server, ksi-retry and ksi-postgres on one fresh database of
the test session's throw-away cluster. The server logs each request's arrival time and the usage it answered,
so the windows are checked on its side: the tokens it received in every 2 s window stay under the one limit,
while each host alone would have let the limit through (three hosts: up to three times as many tokens).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from ksi_limits.plugin import Plugin as Limits
from ksi_postgres.plugin import Plugin as Postgres
from ksi_postgres.windows import PgWindowStore
from ksi_provider_openai.plugin import Plugin as OpenAI
from ksi_retry.plugin import Plugin as Retry

from ksi_host import Host
from ksi_host.models import CompletionRequest

WINDOW_S = 2.0
TPM = 1500


@pytest.fixture
def pg_env(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KSI_PG_DSN", postgres_dsn)
    return postgres_dsn


def config(server: Any, limits: dict[str, Any], **deployment: Any) -> dict[str, Any]:
    return {
        "postgres": {"dsn_env": "KSI_PG_DSN", "lease_s": 5.0, "poll_s": 0.05, "concurrency": 16, "stop_grace_s": 1.0},
        "openai": {"deployments": [{"name": "local", "model": "gpt-test", "api_base": server.url, **deployment}]},
        "limits": limits,
    }


def requests(n: int, agents: int, seed: int, **extra: Any) -> list[dict[str, Any]]:
    """``n`` requests from ``agents`` agents, each with a few words; ``max_tokens`` bounds the server's echo."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.randint(6, 14)
        out.append({"model": "gpt-test", "prompt": f"agent{i % agents} " + "token " * words, "agent_id": f"a{i % agents}",
                    "max_tokens": words + 2, **extra})
    return out


def most_tokens_in_any_window(arrivals: list[Any], window_s: float) -> int:
    seen = sorted((a.t, a.usage["total_tokens"] if a.usage else 0) for a in arrivals)
    return max(sum(n for u, n in seen[i:] if u < t + window_s) for i, (t, _) in enumerate(seen))


async def test_three_hosts_hold_one_tpm_between_them(openai_server: Any, pg_env: str, tmp_path: Path) -> None:
    limits = {"rules": [{"scope": "deployment", "match": "local", "tpm": TPM, "window_s": WINDOW_S}]}
    limiters = [Limits() for _ in range(3)]
    hosts = [Host(config(openai_server, limits), tmp_path / f"h{i}.db", plugins=[Postgres(), OpenAI(), Retry(), lim])
             for i, lim in enumerate(limiters)]
    async with hosts[0] as a, hosts[1] as b, hosts[2] as c:
        assert all(isinstance(lim.store, PgWindowStore) for lim in limiters)
        t0 = time.monotonic()
        batches = [[await h.submit(r) for r in requests(60, 6, seed=i)] for i, h in enumerate((a, b, c))]
        results = [await t.result() for batch in batches for t in batch]
        elapsed = time.monotonic() - t0
        rows = (await a.status())["limits"]
    assert [r.status for r in results] == ["ok"] * 180
    assert all(len(r.attempts) == 1 for r in results)  # waiting is not an attempt
    arrivals = openai_server.arrivals
    assert len(arrivals) == 180
    total = sum(x.usage["total_tokens"] for x in arrivals)
    assert total > 2.5 * TPM  # three hosts with windows of their own would each let up to TPM through at once
    most = most_tokens_in_any_window(arrivals, WINDOW_S)
    assert most <= TPM, f"the server received {most} tokens within {WINDOW_S} s (limit {TPM}, shared by 3 hosts)"
    assert most >= TPM * 0.5  # the limit was reached, not avoided by running slowly
    assert elapsed >= (total / TPM - 1) * WINDOW_S  # and it held the run back
    assert [(r["name"], r["tpm"], r["in_flight"]) for r in rows] == [("local", TPM, 0)]  # status reads the shared windows


async def test_a_budget_spent_on_one_host_is_refused_on_another_after_the_refresh(openai_server: Any, pg_env: str,
                                                                                tmp_path: Path) -> None:
    # $0.001 per token: a call of ~20 tokens costs ~$0.02; agent a0 may spend $0.10 a day, on all hosts together
    limits = {"budgets": [{"scope": "agent", "match": "a0", "usd": 0.10, "period": "day"}], "budget_refresh_s": 0.5}
    cfg = config(openai_server, limits, input_cost_per_mtok=1000.0, output_cost_per_mtok=1000.0)
    a = Host(cfg, tmp_path / "a.db", plugins=[Postgres(), OpenAI(), Retry(), Limits()])
    b = Host(cfg, tmp_path / "b.db", plugins=[Postgres(), OpenAI(), Retry(), Limits()])

    def request(i: int) -> CompletionRequest:
        return CompletionRequest.from_dict({**requests(1, 1, seed=i)[0], "request_id": f"r{i}"})

    async with a, b:
        first = await b.execute(request(0))  # b reads the ledger now: nothing spent yet
        assert first.ok
        on_a = [await a.execute(request(i)) for i in range(1, 12)]  # a runs a0 to its budget
        refused_on_a = [r for r in on_a if not r.ok]
        assert refused_on_a and all(r.error["type"] == "BudgetExceeded" for r in refused_on_a)
        await asyncio.sleep(0.6)  # b's reading is now older than budget_refresh_s
        late = await b.execute(request(99))
        status = {row["name"]: row for row in (await b.status())["budgets"]}
    assert not late.ok and late.error["type"] == "BudgetExceeded"
    assert "budget exceeded for agent 'a0'" in late.error["message"]
    served = sum(x.body["messages"][0]["content"].startswith("agent0 ") for x in openai_server.arrivals)
    assert served == 1 + len(on_a) - len(refused_on_a) <= 6  # the refused calls reached nobody
    assert status["a0"]["spent_usd"] >= 0.08 and status["a0"]["left_usd"] < 0.03  # b sees what a spent
