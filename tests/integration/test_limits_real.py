"""ksi-limits against the local OpenAI-compatible server, through the real queue, openai provider, retry and
ledger: the tokens the server received in every sliding window stay under the deployment's limit, however many
requests run at once; an agent at its budget is refused and the others go on; nothing waits past its deadline.

The server logs each request's arrival time and the usage it answered (prompt tokens: words + 3 per message;
completion: the words of its echo), so the windows are checked on the server's side. The window is 2 s (the
same arithmetic as 60 s, thirty times faster).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from ksi_limits.plugin import Plugin as Limits
from ksi_provider_openai.plugin import Plugin as OpenAI
from ksi_queue.plugin import Plugin as Queue
from ksi_retry.plugin import Plugin as Retry
from ksi_tokens.plugin import Plugin as Tokens

from ksi_host import Host

WINDOW_S = 2.0
TPM = 2000


def config(server: Any, limits: dict[str, Any], **deployment: Any) -> dict[str, Any]:
    return {
        "queue": {"concurrency": 32},
        "openai": {"deployments": [{"name": "local", "model": "gpt-test", "api_base": server.url, **deployment}]},
        "limits": limits,
    }


def requests(n: int, agents: int, seed: int = 1, **extra: Any) -> list[dict[str, Any]]:
    """``n`` requests from ``agents`` agents, each with a few words; ``max_tokens`` bounds the server's echo."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.randint(6, 14)
        prompt = f"agent{i % agents} " + "token " * words
        out.append({"model": "gpt-test", "prompt": prompt, "agent_id": f"a{i % agents}",
                    "max_tokens": words + 2, **extra})
    return out


def most_tokens_in_any_window(arrivals: list[Any], window_s: float) -> int:
    seen = sorted((a.t, a.usage["total_tokens"] if a.usage else 0) for a in arrivals)
    return max(sum(n for u, n in seen[i:] if u < t + window_s) for i, (t, _) in enumerate(seen))


async def run_all(host: Host, batch: list[dict[str, Any]]) -> list[Any]:
    tickets = [await host.submit(r) for r in batch]
    return [await t.result() for t in tickets]


async def test_two_hundred_requests_from_eight_agents_stay_under_the_deployment_tpm(openai_server: Any, tmp_path: Path) -> None:
    limits = {"rules": [{"scope": "deployment", "match": "local", "tpm": TPM, "window_s": WINDOW_S}]}
    plugins = [Queue(), Retry(), Tokens(), OpenAI(), Limits()]
    async with Host(config(openai_server, limits), tmp_path / "ksi.db", plugins=plugins) as host:
        t0 = time.monotonic()
        results = await run_all(host, requests(200, 8))
        elapsed = time.monotonic() - t0
        (ledger,) = await host.usage_report("total")
    assert [r.status for r in results] == ["ok"] * 200
    assert all(len(r.attempts) == 1 for r in results)  # waiting is not an attempt
    arrivals = openai_server.arrivals
    assert len(arrivals) == 200
    total = sum(a.usage["total_tokens"] for a in arrivals)
    assert ledger["total_tokens"] == total
    most = most_tokens_in_any_window(arrivals, WINDOW_S)
    assert most <= TPM, f"the server received {most} tokens within {WINDOW_S} s (limit {TPM})"
    assert most >= TPM * 0.5  # the limit was reached, not avoided by running slowly
    assert elapsed >= (total / TPM - 1) * WINDOW_S  # and it held the run back


async def test_an_agent_at_its_budget_is_refused_and_the_others_go_on(openai_server: Any, tmp_path: Path) -> None:
    # $0.001 per token: a call of ~20 tokens costs ~$0.02; agent a0 may spend $0.10 a day
    limits = {"budgets": [{"scope": "agent", "match": "a0", "usd": 0.10, "period": "day"}]}
    plugins = [Queue(), Retry(), Tokens(), OpenAI(), Limits()]
    async with Host(config(openai_server, limits, input_cost_per_mtok=1000.0, output_cost_per_mtok=1000.0),
                    tmp_path / "ksi.db", plugins=plugins) as host:
        results = await run_all(host, requests(96, 8))
        by_agent = {row["key"]: row for row in await host.usage_report("agent")}
    mine = results[0::8]  # agent a0's requests
    others = [r for i, r in enumerate(results) if i % 8]
    assert all(r.ok for r in others)
    refused = [r for r in mine if not r.ok]
    assert refused and all(r.error["type"] == "BudgetExceeded" for r in refused)
    assert "budget exceeded for agent 'a0'" in refused[-1].error["message"]
    assert "of the day's $0.10 (limits.budgets[0]: agent 'a0'" in refused[-1].error["message"]
    served = len(mine) - len(refused)
    assert 2 <= served <= 6
    assert sum(a.body["messages"][0]["content"].startswith("agent0 ") for a in openai_server.arrivals) == served
    assert by_agent["a0"]["cost_usd"] <= 0.10  # the estimate held the calls in flight within the budget


async def test_nothing_waits_past_its_deadline(openai_server: Any, tmp_path: Path) -> None:
    limits = {"rules": [{"scope": "deployment", "match": "local", "tpm": 300, "window_s": WINDOW_S}]}
    plugins = [Queue(), Retry(), Tokens(), OpenAI(), Limits()]
    async with Host(config(openai_server, limits), tmp_path / "ksi.db", plugins=plugins) as host:
        results = await run_all(host, requests(60, 8, timeout_s=1.0))
    ok = [r for r in results if r.ok]
    late = [r for r in results if not r.ok]
    assert ok and late and all(r.error["type"] == "DeadlineExceeded" for r in late)
    waited = [r for r in late if "deadline passed while attempt 1 waited for admission to local" in r.error["message"]]
    assert len(waited) >= len(late) / 2
    assert max(r.finished_at - r.started_at for r in results) < 1.0 + 0.3
    # what ran out of time while it waited sent nothing; only an attempt admitted just before its deadline (sent
    # with what was left of it, and timed out) may have reached the server
    cut_short = [r for r in late if "ProviderTimeout" in r.error["message"]]
    assert len(ok) <= len(openai_server.arrivals) <= len(ok) + len(cut_short)
    assert most_tokens_in_any_window(openai_server.arrivals, WINDOW_S) <= 300


async def test_a_session_waits_for_its_agent_and_the_other_sessions_go_on(openai_server: Any, tmp_path: Path) -> None:
    limits = {"rules": [{"scope": "agent", "match": "slow", "rpm": 1, "window_s": 1.0}]}
    plugins = [Queue(), Retry(), Tokens(), OpenAI(), Limits()]
    async with Host(config(openai_server, limits), tmp_path / "ksi.db", plugins=plugins) as host:
        batch = [{"model": "gpt-test", "prompt": f"{agent} {i}", "agent_id": agent, "session_id": agent, "max_tokens": 5}
                 for i in range(3) for agent in ("slow", "fast1", "fast2")]
        t0 = time.time()
        results = await run_all(host, batch)
    assert all(r.ok for r in results)
    done = {(r.session_id, i // 3): r.finished_at - t0 for i, r in enumerate(results)}
    slow = [a.t - t0 for a in openai_server.arrivals if a.body["messages"][0]["content"].startswith("slow")]
    assert [a.body["messages"][0]["content"] for a in openai_server.arrivals
            if a.body["messages"][0]["content"].startswith("slow")] == ["slow 0", "slow 1", "slow 2"]  # in order
    assert slow[2] - slow[0] >= 2.0  # one a second
    assert max(done["fast1", 2], done["fast2", 2]) < slow[1]  # the other sessions did not wait for it
