"""No ``claude`` process, nor anything it starts, outlives its call; output is capped; no model name becomes a flag.

(SIGTERM and SIGKILL of a whole ``ksi-host run`` are in the host's reliability suite:
``tests/reliability/test_provider_claude_cli_orphans.py``.)
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import pytest
from fake_claude import pid_alive, pids

from ksi_host import BadRequest, ConfigError, ProviderTimeout
from ksi_host.models import CompletionRequest

MODEL = "claude-cli/sonnet"


def request(text: str, model: str = MODEL) -> CompletionRequest:
    return CompletionRequest.from_dict({"model": model, "prompt": text})


def provider(host: Any, name: str = "claude-cli") -> Any:
    p = host.pm.get_plugin("Plugin").pool.get(name)
    assert p is not None
    return p


async def all_gone(found: dict[str, list[int]], within_s: float = 3.0) -> bool:
    every = [pid for group in found.values() for pid in group]
    deadline = time.monotonic() + within_s
    while any(pid_alive(pid) for pid in every) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return not any(pid_alive(pid) for pid in every)


@pytest.mark.parametrize("mode", ["!linger", "!lingerpipe"])
async def test_a_child_left_behind_by_a_cli_that_exits_0_is_killed(cc_host: Any, fake_cli: Any, mode: str) -> None:
    async with cc_host() as host:
        t0 = time.monotonic()
        r = await provider(host).complete(request(mode), timeout_s=20)
        elapsed = time.monotonic() - t0
    assert r.text == "left a child behind"
    assert elapsed < 5, elapsed  # a child holding stdout open does not hold the call until its deadline
    found = pids(fake_cli.state)
    assert set(found) == {"claude", "child"}
    assert await all_gone(found), f"left behind: {found}"


async def test_a_grandchild_that_called_setsid_is_killed_at_the_deadline(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        with pytest.raises(ProviderTimeout):
            await provider(host).complete(request("!setsid"), timeout_s=3.0)
    found = pids(fake_cli.state)
    assert set(found) == {"claude", "child", "grandchild"}
    assert await all_gone(found), f"left behind: {found}"


async def test_a_grandchild_that_called_setsid_is_killed_when_the_cli_exits_0(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        r = await provider(host).complete(request("!setsidexit"), timeout_s=20)
    assert r.text == "a grandchild left the group"
    found = pids(fake_cli.state)
    assert set(found) == {"claude", "child", "grandchild"}
    assert await all_gone(found), f"left behind: {found}"


async def test_a_cancelled_call_kills_the_setsid_grandchild_too(cc_host: Any, fake_cli: Any) -> None:
    async with cc_host() as host:
        task = asyncio.ensure_future(provider(host).complete(request("!setsid"), timeout_s=30))
        deadline = time.monotonic() + 20
        while "grandchild" not in pids(fake_cli.state) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await all_gone(pids(fake_cli.state))


@pytest.mark.parametrize("mode", ["!huge", "!hugeerr"])
async def test_output_past_the_cap_fails_the_call_and_reading_stops_there(
    cc_host: Any, fake_cli: Any, mode: str
) -> None:
    """A 300 MB answer took 1.2 GB and was stored; now reading stops at max_output_bytes (1 MiB here)."""
    async with cc_host(table={"max_output_bytes": 1 << 20}) as host:
        p = provider(host)
        tracemalloc.start()
        try:
            with pytest.raises(BadRequest) as info:
                await p.complete(request(mode), timeout_s=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        r = await host.complete({"model": MODEL, "prompt": "fine"})  # the next call is unaffected
    stream = "stdout" if mode == "!huge" else "stderr"
    assert f"wrote more than 1048576 bytes on {stream}" in info.value.message
    assert "max_output_bytes" in info.value.message
    assert peak < 16 * (1 << 20), f"peak {peak / 2**20:.0f} MiB while reading a 300 MiB answer"
    assert r.ok, r.error


async def test_an_answer_under_the_cap_is_whole(cc_host: Any, fake_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLAUDE_HUGE_MB", "2")
    async with cc_host(table={"max_output_bytes": 3 << 20}) as host:
        with pytest.raises(Exception) as info:  # 2 MiB of "x" then the JSON result: not the CLI's JSON
            await provider(host).complete(request("!huge"), timeout_s=30)
    assert "stdout is not the CLI's JSON result (2097" in str(info.value)  # every byte was read


@pytest.mark.parametrize("model", [
    "cc/--dangerously-skip-permissions", "cc/-p", "cc/son net", "cc/sonnet\n--evil", "cc/a\tb", "cc/x\x00y",
])
async def test_a_model_name_that_would_become_a_flag_is_refused_before_a_process_starts(
    cc_host: Any, fake_cli: Any, model: str
) -> None:
    table = {"deployments": [{"name": "cc", "model": "cc/*", "cli_model": "{suffix}"}]}
    async with cc_host(table=table) as host:
        r = await host.complete({"model": model, "prompt": "hi"})
        builtin = await host.complete({"model": "claude-cli/" + model.split("/", 1)[1], "prompt": "hi"})
    for result in (r, builtin):
        assert result.error["type"] == "BadRequest", result.error
        assert "no claude process was started" in result.error["message"]
    assert fake_cli.calls() == []


@pytest.mark.parametrize(("table", "words"), [
    ({"deployments": [{"name": "x", "model": "m", "cli_model": "--dangerously-skip-permissions"}]},
     "cli_model starts with '-'"),
    ({"deployments": [{"name": "x", "model": "m", "cli_model": "son net"}]}, "cli_model holds whitespace"),
    ({"deployments": [{"name": "x", "model": "m", "extra_args": ["--x\x00"]}]}, "extra_args[0] must not hold control"),
    ({"max_output_bytes": 0}, "max_output_bytes"),
    ({"max_output_bytes": 10}, "max_output_bytes must be between 1024"),
    ({"max_output_bytes": 1 << 40}, "max_output_bytes must be between 1024"),
])
async def test_config_refuses_flags_and_bad_caps(cc_host: Any, fake_cli: Any, table: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        async with cc_host(table=table):
            pass
    assert words in str(info.value)
